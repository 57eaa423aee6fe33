"""Inference backends: the window runners the sliding window calls.

A runner maps a batch of windows ``(B, 1, *roi)`` to logits ``(B, G*C, *roi)`` where ``G`` is
the number of ensemble members (their probabilities are averaged after blending). Three kinds:

* ``torch``: the PyTorch modules, on CPU or CUDA (mixed precision fp16/bf16, optional
  ``torch.compile``);
* ``onnxruntime``: an exported ``.onnx`` file run by ONNX Runtime (CPU, or CUDA where the
  GPU build is installed);
* ``torchscript``: an exported TorchScript file.

Exported files carry the resolved model config (labels, preprocessing, window size) inside
them (:mod:`medseg.inference.export`), so they predict on their own.
"""

from __future__ import annotations

import itertools
import json
import os
import types
import warnings
from pathlib import Path

import torch

from medseg.core.errors import CheckpointError, ConfigError
from medseg.models.loading import META_KEY, import_onnxruntime, read_export_metadata

BACKENDS = ("torch", "onnxruntime", "torchscript")
#: Windows per forward pass in fp32 on a CPU (a larger sliding-window batch, or one doubled by mirror TTA, is split):
#: with two threads a batch adds little parallelism, and a larger one only a larger working set. Per window through
#: the default hippocampus DynUNet on 2 cores, channels-last (:func:`use_fast_cpu_kernels`): 86-97 ms at batch 1,
#: 58-71 at 2, 64-67 at 3, 64-69 at 4, 83-108 at 6 (``docs/benchmarks.md``). Each window's values do not depend on
#: its batch.
CPU_FP32_BATCH = 2


def cpu_threads() -> int:
    """Cores this process may run on (affinity and cgroup aware), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def check_backend(name: str) -> str:
    name = (name or "torch").lower()
    if name == "ort":
        name = "onnxruntime"
    if name not in BACKENDS:
        raise ConfigError("unknown inference backend", expected=" | ".join(BACKENDS), found=repr(name),
                          fix="use --backend torch or --backend onnxruntime")
    return name


class Ensemble(torch.nn.Module):
    """Runs every member on the same windows and concatenates their logits along channels (one ensemble group
    each), or with ``average_logits`` returns their mean (one group; nnU-Net's fold ensembling)."""

    def __init__(self, nets, average_logits: bool = False) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.average_logits = average_logits

    @property
    def groups(self) -> int:
        return 1 if self.average_logits else len(self.nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [net(x) for net in self.nets]
        if len(outs) == 1:
            return outs[0]
        if self.average_logits:
            return torch.stack(outs).mean(0)
        return torch.cat(outs, dim=1)


def _cpu_fp32_inference(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
        and not torch.is_autocast_enabled("cpu")


CL3D = torch.channels_last_3d


def _channels_last_weight(self) -> torch.Tensor:
    """The layer's weight in channels-last order, made once and again only after the weight changes (an optimiser
    step bumps its version): oneDNN picks the activations' layout from the weight's, and a weight with one input
    channel (the first layer's) is channels-last only if its strides are made so explicitly."""
    w = self.weight
    key = (w.data_ptr(), w._version)
    if getattr(self, "_cl_key", None) != key:
        self._cl_weight = torch.empty_like(w, memory_format=CL3D).copy_(w)
        self._cl_key = key
    return self._cl_weight


def _onednn_conv3d_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _cpu_fp32_inference(x):
        w = _channels_last_weight(self) if self._medseg_channels_last else self.weight
        return torch.ops.aten.mkldnn_convolution(x, w, self.bias, self.padding, self.stride, self.dilation,
                                                 self.groups)
    return torch.nn.Conv3d.forward(self, x)


def _channels_last_transposed_conv3d_forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
    if output_size is None and _cpu_fp32_inference(x):
        return torch.nn.functional.conv_transpose3d(x, _channels_last_weight(self), self.bias, self.stride,
                                                    self.padding, self.output_padding, self.groups, self.dilation)
    return torch.nn.ConvTranspose3d.forward(self, x, output_size)


def _channel_rows(x: torch.Tensor) -> tuple[torch.Tensor, int] | tuple[None, None]:
    """A view of ``(B, C, …)`` with the voxels of each channel along one dimension (returned beside it), without a
    copy: ``(B, C, N)`` for the usual layout, ``(B, N, C)`` for channels-last; ``(None, None)`` for any other."""
    b, c = x.shape[:2]
    if x.is_contiguous():
        return x.view(b, c, -1), 2
    if x.dim() == 5 and x.is_contiguous(memory_format=CL3D):
        return x.permute(0, 2, 3, 4, 1).reshape(b, -1, c), 1
    return None, None


def _instance_norm_scale_shift(norm, x: torch.Tensor):
    """Per-sample, per-channel ``(scale, shift)`` shaped ``(B, C, 1, 1, 1)`` that instance-normalise ``x``, from one
    sum and one sum of squares per channel (E[x²] - E[x]²); ``None`` where that difference would lose digits (the
    mean large against the spread) or the layout is neither of :func:`_channel_rows`'s."""
    v, dim = _channel_rows(x)
    if v is None:
        return None
    n = v.shape[dim]
    mean = v.sum(dim) / n
    # the dot products as the diagonal of a (B, C, C) product: one read of the activations, no (B, C, N) temporary
    rows = v if dim == 2 else v.transpose(1, 2)
    var = torch.bmm(rows, rows.transpose(1, 2)).diagonal(dim1=1, dim2=2) / n - mean * mean
    if not bool((var > 1e-3 * mean * mean).all()):
        return None
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
        shift = norm.bias - mean * scale
    else:
        shift = -mean * scale
    shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
    return scale.view(shape), shift.view(shape)


def _sum_dot_instance_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    # statistics from one sum and one dot product per channel, then one fused multiply-add; where the mean is
    # large against the spread (where that difference would lose digits) PyTorch's own kernel runs
    if x.dim() == 5 and _cpu_fp32_inference(x):
        factors = _instance_norm_scale_shift(self, x)
        if factors is not None:
            return torch.addcmul(factors[1], x, factors[0])
    return torch.nn.InstanceNorm3d.forward(self, x)


def _norm_leaky_relu_(x: torch.Tensor, norm, slope: float) -> torch.Tensor:
    """Instance norm then leaky ReLU, in place on ``x`` (a convolution's fresh output that nothing else holds)."""
    factors = _instance_norm_scale_shift(norm, x) if type(norm) is torch.nn.InstanceNorm3d and \
        not norm.track_running_stats else None
    if factors is None:
        return torch.nn.functional.leaky_relu_(norm(x), slope)
    return torch.nn.functional.leaky_relu_(x.mul_(factors[0]).add_(factors[1]), slope)


def _fused_basic_block_forward(self, inp: torch.Tensor) -> torch.Tensor:
    from monai.networks.blocks.dynunet_block import UnetBasicBlock

    if not (inp.dim() == 5 and _cpu_fp32_inference(inp)):
        return UnetBasicBlock.forward(self, inp)
    slope = self.lrelu.negative_slope
    out = _norm_leaky_relu_(self.conv1(inp), self.norm1, slope)
    return _norm_leaky_relu_(self.conv2(out), self.norm2, slope)


def _gemm_upsampling(block) -> bool:
    """Whether a MONAI ``UnetUpBlock`` upsamples with a plain 3D transposed convolution whose kernel equals its
    stride (each input voxel paints its own output block: a matrix product, then a reshuffle)."""
    conv = getattr(block.transp_conv, "conv", None)
    if type(conv) is not torch.nn.ConvTranspose3d or len(block.transp_conv) != 1:
        return False
    plain = conv.groups == 1 and conv.padding_mode == "zeros" and tuple(conv.padding) == (0, 0, 0) and \
        tuple(conv.output_padding) == (0, 0, 0) and tuple(conv.dilation) == (1, 1, 1)
    return plain and tuple(conv.kernel_size) == tuple(conv.stride)


def _fused_up_block_forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    from monai.networks.blocks.dynunet_block import UnetUpBlock

    if not (inp.dim() == 5 and inp.shape[0] == 1 and _cpu_fp32_inference(inp)
            and inp.is_contiguous(memory_format=CL3D)):
        return UnetUpBlock.forward(self, inp, skip)
    conv = self.transp_conv.conv  # checked by _gemm_upsampling when the forward was switched
    b, cin, d, h, w = inp.shape
    cout, (kd, kh, kw) = conv.out_channels, conv.stride
    shape = (b, d * kd, h * kh, w * kw)
    if tuple(skip.shape[2:]) != shape[1:]:
        return UnetUpBlock.forward(self, inp, skip)
    # one window: PyTorch would run its slow reference kernel for the transposed convolution (oneDNN's serves
    # larger batches, and is faster there than this); here it is one matrix product, reshuffled and written with
    # the skip connection into one channels-last buffer, which is MONAI's concatenation
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(cin, kd * kh * kw * cout)
    rows = inp.permute(0, 2, 3, 4, 1).reshape(-1, cin)
    up = rows @ weight if conv.bias is None else torch.addmm(conv.bias.repeat(kd * kh * kw), rows, weight)
    # reshuffled whole first: one 8-dimensional strided copy straight into the buffer took twice as long
    up = up.view(b, d, h, w, kd, kh, kw, cout).permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous()
    both = torch.empty((*shape, cout + skip.shape[1]), dtype=inp.dtype)
    both[..., :cout].copy_(up.view(*shape, cout))
    both[..., cout:].copy_(skip.permute(0, 2, 3, 4, 1))
    return self.conv_block(both.permute(0, 4, 1, 2, 3))


def _inference_skip_layer_forward(self, x: torch.Tensor) -> torch.Tensor:
    from monai.networks.nets.dynunet import DynUNetSkipLayer

    if self.training:
        return DynUNetSkipLayer.forward(self, x)
    # out of training DynUNet returns its main output only: the deep-supervision heads' outputs are never read
    down = self.downsample(x)
    return self.upsample(self.next_layer(down), down)


def _has_dynunet_blocks(module: torch.nn.Module) -> bool:
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    return any(type(m) in (UnetBasicBlock, UnetResBlock) for m in module.modules())


def use_onednn_conv3d(module: torch.nn.Module, channels_last: bool = False) -> int:
    """Run the 3D convolutions of ``module`` through oneDNN on the CPU in fp32 inference, whatever the batch size;
    returns how many were switched. ``channels_last``: with channels-last weights (:func:`use_fast_cpu_kernels`).

    PyTorch chooses oneDNN for a CPU convolution only when the batch holds more than one sample or the input's
    first four dimensions hold over 20,480 values (a rule made for 2D images); a single 3D window of
    40×56×40 with 8 or 16 channels fails it at most levels of a U-Net and runs the naive im2col kernel: on
    2 CPU cores one window through the hippocampus DynUNet 16-128 took 211 ms that way and 137 ms in oneDNN,
    through MONAI's UNet 16-128 76 ms and 32 ms (``docs/benchmarks.md``). The same kernel as a batch of two
    (identical results); training (gradients on) and autocast keep PyTorch's own choice."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in module.modules():
        if type(m) is torch.nn.Conv3d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m._medseg_channels_last = channels_last
            m.forward = types.MethodType(_onednn_conv3d_forward, m)
            n += 1
    return n


def use_fast_cpu_kernels(module: torch.nn.Module, channels_last: bool = False) -> dict[str, int]:
    """The CPU fp32 inference paths for 3D networks, switched on in ``module``; returns how many layers of each kind
    were switched. Gradients, autocast and other devices keep PyTorch's own kernels.

    * ``conv3d``: the convolutions of :func:`use_onednn_conv3d`;
    * ``instance_norm3d``: instance normalisation without running statistics, from one sum and one dot product
      per channel (values within about 3e-5 of PyTorch's). PyTorch's own kernel gets its statistics through batch
      norm's Welford pass: 4.1 ms for 16 channels of 40×56×40 on 2 cores against 1.8 ms here;
    * ``fused_blocks``: MONAI's ``UnetBasicBlock`` (DynUNet's) normalises and activates each convolution's output
      in place: two passes over memory written once instead of three into new memory;
    * ``skip_heads``: DynUNet's deep-supervision heads are not computed out of training (nothing reads them);
    * ``fused_upsampling`` (with ``channels_last``): for one window, DynUNet's up blocks upsample with one matrix
      product into the buffer they concatenate into, where PyTorch would run its slow transposed convolution
      (a window of the default network 84 against 67 ms; larger batches keep oneDNN's, as fast there);
    * with ``channels_last``, ``transposed_conv3d`` too, and every convolution takes channels-last weights, so
      that the activations stay channels-last from the first layer to the last: oneDNN's 3D convolutions run
      without reordering their inputs (for the hippocampus DynUNet, a 16-to-16 3×1×3 convolution over two
      40×56×40 windows took 9.5 ms, 7.0 ms channels-last). The runner hands the first layer a channels-last
      window (:class:`TorchRunner`).

    A whole window through the hippocampus DynUNet 16-128 on 2 cores: ``docs/benchmarks.md``."""
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetUpBlock
    from monai.networks.nets.dynunet import DynUNetSkipLayer

    counts = {"conv3d": use_onednn_conv3d(module, channels_last), "instance_norm3d": 0, "fused_blocks": 0,
              "skip_heads": 0, "fused_upsampling": 0, "transposed_conv3d": 0}
    for m in module.modules():
        if type(m) is torch.nn.InstanceNorm3d and not m.track_running_stats:
            m.forward = types.MethodType(_sum_dot_instance_norm_forward, m)
            counts["instance_norm3d"] += 1
        elif type(m) is UnetBasicBlock and type(m.lrelu) is torch.nn.LeakyReLU:
            m.forward = types.MethodType(_fused_basic_block_forward, m)
            counts["fused_blocks"] += 1
        elif type(m) is DynUNetSkipLayer and m.super_head is not None:
            m.forward = types.MethodType(_inference_skip_layer_forward, m)
            counts["skip_heads"] += 1
        elif channels_last and type(m) is UnetUpBlock and _gemm_upsampling(m):
            m.forward = types.MethodType(_fused_up_block_forward, m)
            counts["fused_upsampling"] += 1
        elif channels_last and type(m) is torch.nn.ConvTranspose3d and m.padding_mode == "zeros" and \
                torch.backends.mkldnn.is_available():
            m.forward = types.MethodType(_channels_last_transposed_conv3d_forward, m)
            counts["transposed_conv3d"] += 1
    return counts


def mirror_passes(axes, combinations: bool = False) -> list[tuple[int, ...]]:
    """The mirror images TTA adds: one per axis, or every non-empty combination of the axes (nnU-Net's)."""
    axes = [int(a) for a in axes]
    if not combinations:
        return [(a,) for a in axes]
    return [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


class MirrorRunner:
    """Mirror test-time augmentation inside one forward pass: each batch of windows goes through ``runner``
    together with its mirror images (:func:`mirror_passes` of ``axes``, spatial axes, 0-based), and each mirrored
    output is flipped back. The passes come out as extra ensemble groups, so the sliding window averages their
    probabilities as it averages ensemble members'; with ``average_logits`` their logits are averaged here
    instead (nnU-Net's TTA). One pass over the volume instead of one per mirror image: the windows are cut, padded
    and blended once, and on a GPU the larger batch fills the device better. On a CPU with oneDNN convolutions
    (:func:`use_onednn_conv3d`) two windows cost about twice one, so there the network time stays what separate
    passes cost (``docs/benchmarks.md``)."""

    def __init__(self, runner, axes, *, combinations: bool = False, average_logits: bool = False) -> None:
        self.runner = runner
        self.flips = mirror_passes(axes, combinations)
        self.passes = 1 + len(self.flips)
        self.average_logits = average_logits
        self.groups = runner.groups * (1 if average_logits else self.passes)
        self.device = runner.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = torch.cat([x] + [torch.flip(x, dims=[2 + a for a in f]) for f in self.flips])
        out = self.runner(batch)
        parts = [out[:n]] + [torch.flip(out[(i + 1) * n:(i + 2) * n], dims=[2 + a for a in f])
                             for i, f in enumerate(self.flips)]
        if self.average_logits:
            return torch.stack(parts).mean(0)
        return torch.cat(parts, dim=1)


class TorchRunner:
    def __init__(self, nets, device: torch.device, *, amp: bool = True, amp_dtype: str = "auto",
                 compile: bool = False, channels_last: bool = False, average_logits: bool = False) -> None:
        from medseg.core.runtime import amp_dtype as resolve_dtype, keep_freed_cpu_memory

        module = Ensemble(nets, average_logits).to(device).eval()
        self.groups = module.groups
        self.device = device
        self.amp = amp
        self.dtype = resolve_dtype(amp_dtype, device)
        # fp32 on a CPU: at most CPU_FP32_BATCH windows per forward pass (see the constant)
        self.chunk = CPU_FP32_BATCH if device.type == "cpu" and not (amp and self.dtype == torch.bfloat16) else 0
        # fp32 on a CPU: 3D windows go in channels-last, and stay so through the layers (use_fast_cpu_kernels)
        self.cpu_channels_last = False
        if device.type == "cpu":
            keep_freed_cpu_memory()
            if not compile:
                # channels-last where it was measured faster: DynUNet's blocks (MONAI's UNet ran one window
                # 33 against 30 ms that way; docs/benchmarks.md)
                layout = bool(self.chunk) and _has_dynunet_blocks(module)
                self.cpu_channels_last = use_fast_cpu_kernels(module, channels_last=layout)["conv3d"] > 0 and layout
        # channels-last activations suit cuDNN's 3D convolutions (on a CPU, cpu_channels_last above decides)
        self.channels_last = channels_last
        if channels_last:
            module = module.to(memory_format=torch.channels_last_3d)
        if compile:
            try:
                module = torch.compile(module, dynamic=False)
            except Exception as exc:  # noqa: BLE001 - compilation is optional
                raise ConfigError("torch.compile is not available here", found=f"{type(exc).__name__}: {exc}"[:200],
                                  fix="run without --compile") from None
        self.module = module

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from medseg.core.runtime import autocast

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.amp, self.dtype):
            layout = self.cpu_channels_last and x.dim() == 5 and _cpu_fp32_inference(x)
            parts = x.split(self.chunk) if self.chunk and x.shape[0] > self.chunk else (x,)
            outs = [self.module(part.contiguous(memory_format=CL3D)).contiguous() if layout else self.module(part)
                    for part in parts]
            return outs[0] if len(outs) == 1 else torch.cat(outs)


class OnnxRunner:
    def __init__(self, path: str | Path, *, device: torch.device | None = None, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or cpu_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError("cannot load ONNX model", path=path, expected="an ONNX file from 'medseg export'",
                                  found=str(exc).splitlines()[0][:200], fix="export the model again") from None
        self.input = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.groups = int(json.loads(meta[META_KEY]).get("groups", 1)) if META_KEY in meta else 1
        self.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])


class TorchScriptRunner:
    def __init__(self, path: str | Path, *, device: torch.device, amp: bool = True, amp_dtype: str = "auto") -> None:
        from medseg.core.runtime import amp_dtype as resolve_dtype

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.amp, self.dtype = device, amp, resolve_dtype(amp_dtype, device)
        self.groups = int(read_export_metadata(path).get("groups", 1))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from medseg.core.runtime import autocast

        with autocast(self.device, self.amp, self.dtype):
            return self.module(x)


