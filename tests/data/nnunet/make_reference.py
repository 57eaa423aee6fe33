# Made once in nnU-Net's own environment (nnunetv2 2.8.1, python tests/data/nnunet/make_reference.py): reference
# outputs of its resampling, cropping and normalisation for tests/test_nnunet.py.
import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
rng = np.random.default_rng(0)
out = {}
for i, (shape, new, sp, nsp, order) in enumerate([
    ((1, 9, 11, 8), (11, 12, 7), (1.2, 0.9, 1.1), (1.0, 1.0, 1.0), 3),      # isotropic-ish: cubic spline, all axes
    ((2, 4, 11, 9), (14, 12, 8), (4.0, 0.9, 1.1), (1.0, 1.0, 1.0), 3),      # coarse axis 0: in-plane cubic, nearest along it
    ((3, 12, 10, 9), (3, 9, 8), (1.0, 1.0, 1.0), (4.0, 1.2, 1.1), 1),       # coarse target (probabilities, order 1)
    ((1, 10, 4, 9), (9, 15, 8), (1.0, 4.5, 1.0), (1.1, 1.5, 1.1), 3)]):     # coarse axis 1
    x = rng.normal(size=shape).astype(np.float32)
    y = resample_data_or_seg_to_shape(x, new, sp, nsp, is_seg=False, order=order, order_z=0, force_separate_z=None)
    out.update({f"x{i}": x, f"y{i}": y, f"new{i}": np.array(new), f"sp{i}": np.array(sp), f"nsp{i}": np.array(nsp),
                f"order{i}": np.array(order)})
np.savez_compressed("/work/main/tests/data/nnunet/resampling.npz", **out)

# cropping to the non-zero region and the normalisation schemes
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization, ZScoreNormalization
img = rng.normal(100, 30, size=(2, 14, 12, 10)).astype(np.float32)
img[:, :3] = 0
img[:, :, -2:] = 0
img[:, 6, 5, 5] = 0  # a hole inside the non-zero region: filled, so it stays in the mask
data, seg, bbox = crop_to_nonzero(img.copy())
props = {"mean": 90.0, "std": 20.0, "percentile_00_5": 40.0, "percentile_99_5": 150.0}
ref = {"img": img, "bbox": np.array(bbox), "mask": seg[0] >= 0,
       "zscore_mask": ZScoreNormalization(True, props).run(data[0].copy(), seg[0]),
       "zscore_all": ZScoreNormalization(False, props).run(data[1].copy(), seg[0]),
       "ct": CTNormalization(False, props).run(data[0].copy(), seg[0])}
np.savez_compressed("/work/main/tests/data/nnunet/normalization.npz", **ref)
