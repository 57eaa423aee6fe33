"""2D semantic segmentation of PNG/JPEG images (FCN, SegNet, DeepLabV3+, U-Net), behind the same
model registry and CLI as the volume models: datasets, training, prediction with colour overlays,
IoU evaluation and annotation import."""
