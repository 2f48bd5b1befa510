"""Weight-only int8 and int4 for the decoder's linear layers, as module swaps: the model classes know nothing of it.

    model = LFM2Audio.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8")   # calls load_quantized

int8 is gpt-fast's scheme: symmetric int8 weights, one scale per output channel, activations left as they are.
int4 is gpt-fast's too: asymmetric 4-bit weights, a scale and a zero per group of INT4_GROUP inputs, bf16
activations, through torch's weight-only int4 kernels (tinygemm on CUDA). Decoding reads every weight once per step,
so the bytes are the speed. "int4" puts the parts named in MIXES in 4 bits and leaves the rest int8. The float file
is read tensor by tensor and each weight quantized as it arrives, so the float model never exists in memory.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

import checkpoint

# the linear layers of each part (names start with these), and the parts each scheme puts in 4 bits (the rest int8);
# "int4-PART" puts PART alone in 4 bits (bench.py accuracy measures each part so)
PARTS = {"backbone": ("lfm.layers.",), "depthformer": ("depth_linear", "depthformer."),
         "heads": ("text_head", "depth_embeddings.")}
MIXES = {"int8": (), "int4": ("backbone", "depthformer", "heads")}
SCHEMES = (*MIXES, *(f"int4-{part}" for part in PARTS))
INT4_GROUP = 128  # inputs per int4 scale and zero: chosen by bench.py accuracy and speed (BENCHMARKS.md)
INT4_ROWS = 16  # the int4 kernels take a multiple of this many output rows: the codebook heads' 2049 are padded
INT8_ROWS = 4096  # rows quantized at a time: the fp32 temporaries of a 65536-row table would be ~1 GB
FOLD_K = (2048, 4096)  # on the CPU, int8 rows of K in [2048, 4096) bytes are stored in pairs (see Int8Linear)
FOLD_MAX_ROWS = 16  # inputs of up to this many rows multiply folded weights directly (see Int8Linear)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scales [N] fp32) with w ~= q * scales[:, None]; +-127, so that
    -w quantizes to -q."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], device=w.device)
    for i in range(0, w.shape[0], INT8_ROWS):
        rows = w[i:i + INT8_ROWS].float()
        s = rows.abs().amax(1).clamp(min=1e-12) / 127  # an all-zero row gets zeros, not NaNs
        q[i:i + INT8_ROWS] = torch.round(rows / s[:, None]).clamp(-127, 127)
        scales[i:i + INT8_ROWS] = s
    return q, scales


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scales (+ bias), q int8 [N, K], one scale per output channel.

    On the CPU: the int8 kernel `_weight_int8pack_mm` with bf16 activations (with fp32 ones it runs far slower).
    It is bound by how fast each core streams weight rows, and streams rows of 4 KB faster than rows of 2 KB, so
    with `fold` 2 the rows are stored in pairs, `weight` [N/2, 2K]: row i beside row N/2 + i. An input x [M, K]
    of a few rows (decoding) multiplies them as block_diag(x, x) [2M, 2K], whose two row blocks are the two
    halves of y (the zeros cost little next to the reads); a longer one (a prefill chunk) multiplies an
    unfolded copy. Elsewhere: dequantize-then-matmul, which torch.compile fuses into one kernel."""

    def __init__(self, out_features: int, in_features: int, scale_dtype: torch.dtype,
                 bias: torch.Tensor | None = None, fold: int = 1):
        super().__init__()
        self.fold = fold
        self.register_buffer("weight", torch.empty(out_features // fold, fold * in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype))
        self.register_buffer("unit", None, persistent=False)  # folded: the kernel's own scales, ones [N/2]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def load_float(self, w: torch.Tensor):
        """Quantize float weights w [N, K] into this layer."""
        q, scales = int8_per_channel(w)
        self.weight.copy_(q.view(self.fold, -1, q.shape[1]).transpose(0, 1).reshape(self.weight.shape))
        self.scales.copy_(scales)
        if self.fold > 1:
            self.unit = self.scales.new_ones(self.weight.shape[0])

    def unfolded(self) -> torch.Tensor:
        """q int8 [N, K] (a copy when folded)."""
        return self.weight.view(self.weight.shape[0], self.fold, -1).transpose(0, 1).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        if not self.weight.is_cpu:
            y = F.linear(x, self.unfolded().to(x.dtype)) * self.scales
            return y if self.bias is None else y + self.bias
        # ~300 calls per audio frame: the casts are skipped when they would be no-ops (a bf16 model)
        x2 = x.reshape(-1, x.shape[-1])  # the kernel takes 2-D input only
        if x.dtype != self.scales.dtype:
            x2 = x2.to(self.scales.dtype)
        m = x2.shape[0]
        if self.fold == 1 or m > FOLD_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.unfolded().contiguous(), self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(torch.block_diag(x2, x2), self.weight, self.unit)  # [2M, N/2]
            y = y.view(2, m, -1).transpose(0, 1).reshape(m, -1) * self.scales
        y = y.view(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_from(weight: torch.Tensor, bias: torch.Tensor | None, device) -> Int8Linear:
    """An Int8Linear for `weight` [N, K] to run on `device` (only its shape when `weight` is on the meta device):
    on the CPU bf16 scales (the kernel's) and rows of K in FOLD_K folded; elsewhere scales in the weight's dtype."""
    cpu = torch.device(device).type == "cpu"
    fold = 2 if cpu and FOLD_K[0] <= weight.shape[1] < FOLD_K[1] and weight.shape[0] % 2 == 0 else 1
    with torch.device(weight.device):
        layer = Int8Linear(*weight.shape, torch.bfloat16 if cpu else weight.dtype, bias, fold)
    if weight.device.type != "meta":
        with torch.no_grad():
            layer.load_float(weight)
    return layer


def int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int32 in 0..15, scales [N, K/group], zeros [N, K/group]) with
    w ~= (q - 8) * scale + zero in each group: its minimum and maximum map onto 0 and 15."""
    g = w.float().unflatten(1, (-1, group))  # [N, K/group, group]
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6)  # a constant group gets a finite scale
    q = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32).flatten(1)
    return q, scales, lo + 8 * scales


class Int4Linear(nn.Module):
    """y = x @ dequantized(W).T (+ bias), W in 4 bits with a bf16 scale and zero per group of `group` inputs,
    packed for the device's kernel: `_weight_int4pack_mm_for_cpu` on the CPU, tinygemm's `_weight_int4pack_mm` on
    CUDA (their layouts differ). Rows are padded to a multiple of INT4_ROWS; the padding is cut off the output."""

    def __init__(self, out_features: int, in_features: int, group: int, device, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.group, self.cpu = out_features, group, torch.device(device).type == "cpu"
        if not self.cpu and torch.device(device).type != "cuda":
            raise ValueError(f"int4 runs on cpu and cuda, not {device} (int8 runs anywhere)")
        n = -(-out_features // INT4_ROWS) * INT4_ROWS
        packed = (n, in_features // 2) if self.cpu else (n // 8, in_features // 128, 32, 4)  # CUDA: 8 inner k-tiles
        self.register_buffer("weight", torch.empty(packed, dtype=torch.uint8 if self.cpu else torch.int32))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, n, 2, dtype=torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def load_float(self, w: torch.Tensor):
        """Quantize float weights w [N, K] into this layer, INT8_ROWS rows at a time (bounds the temporaries)."""
        w = F.pad(w, (0, 0, 0, self.scales_and_zeros.shape[1] - w.shape[0]))
        packed = []
        for i in range(0, w.shape[0], INT8_ROWS):
            q, scales, zeros = int4_groupwise(w[i:i + INT8_ROWS], self.group)
            if self.cpu:
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            else:  # two 4-bit values a byte, the even input in the high half, then tinygemm's tiled layout
                pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                packed.append(torch.ops.aten._convert_weight_to_int4pack(pairs, 8))
            self.scales_and_zeros[:, i:i + INT8_ROWS] = torch.stack([scales, zeros], -1).transpose(0, 1)
        self.weight.copy_(torch.cat(packed).view(self.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernels take 2-D bf16 input only
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x2, self.weight, self.group, self.scales_and_zeros)[:, :self.out_features]
        y = y.view(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


def int4_from(weight: torch.Tensor, bias: torch.Tensor | None, device, group: int | None = None) -> Int4Linear:
    """An Int4Linear for `weight` [N, K] laid out for `device` (only its shape when `weight` is on the meta device),
    in groups of `group` inputs (INT4_GROUP unless given)."""
    with torch.device(weight.device):
        layer = Int4Linear(*weight.shape, group or INT4_GROUP, device, bias)
    if weight.device.type != "meta":
        with torch.no_grad():
            layer.load_float(weight)
    return layer


def int4_parts(scheme: str) -> tuple[str, ...]:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be None or one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}")
    return MIXES.get(scheme, (scheme.removeprefix("int4-"),))


def quantizable(model, name: str) -> bool:
    """The linear layers decoding reads: the backbone blocks, depth_linear, the depthformer, the text head and
    the tied codebook heads (their float tables stay, for exact_top). The embeddings, norms, the encoder and
    the adapter stay as they are."""
    if name.startswith("depth_embeddings."):
        return model.get_submodule(name.rpartition(".")[0]).tie
    return name.startswith(("lfm.layers.", "depth_linear", "depthformer.")) or name == "text_head"


def quantize(model, device, scheme: str = "int8"):
    """Swap the quantizable linear layers of `model` for quantized ones laid out for `device`, quantizing their
    weights (on the meta device: only the shapes)."""
    four = tuple(prefix for part in int4_parts(scheme) for prefix in PARTS[part])
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and quantizable(model, name):
            owner, _, attr = name.rpartition(".")
            make = int4_from if name.startswith(four) else int8_from
            setattr(model.get_submodule(owner), attr, make(module.weight, module.bias, device))
    return model


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, one tensor at a time, in file order, read with plain reads: a
    memory map (as safetensors' own reader uses) would leave the whole file in this process's RSS."""
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
            for begin, name, v in entries:
                end = v["data_offsets"][1]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(8 + n + begin)
                if f.readinto(buf.numpy()) != end - begin:
                    raise ValueError("truncated")
                yield name, buf.view(SAFETENSORS_DTYPES[v["dtype"]]).view(v["shape"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # bad header, unknown dtype, short file
            raise ValueError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def load_quantized(model, weights: Path, device, scheme: str = "int8"):
    """`model` (float, on the meta device) filled from the safetensors file `weights`, its quantizable linears
    quantized as each tensor is read: peak memory is the quantized model plus one float tensor."""
    int4_parts(scheme)  # an unknown scheme fails before anything is read
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except SafetensorError as e:  # the reader's message does not name the file
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
    # names and shapes checked as a plain load checks them, with meta tensors: nothing is read yet
    checkpoint.load_state(model, {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, str(weights))
    sources = {k: k for k in model.state_dict()}  # each tensor of the model -> its name in the file
    for a, b in model.tied_pairs():  # a tied pair may be stored once
        sources[a] = sources[b] = a if a in shapes else b
    targets = {}  # name in the file -> the model tensors it fills
    for target, source in sources.items():
        targets.setdefault(source, []).append(target)
    model = quantize(model, device, scheme).to_empty(device=device)
    model.tie_weights()  # tied weights left float were copied apart by to_empty
    with torch.no_grad():
        for name, tensor in read_safetensors(weights):
            tensor = tensor.to(device)
            for target in targets.get(name, []):
                owner, _, attr = target.rpartition(".")
                module = model.get_submodule(owner)
                if isinstance(module, (Int8Linear, Int4Linear)) and attr == "weight":
                    module.load_float(tensor)
                else:
                    getattr(module, attr).copy_(tensor)
    return model
