"""A pure-torch NF4 codec in bitsandbytes' format, to check lora_core.train.quant's NF4 maths where bitsandbytes
cannot run (no CUDA here). It is not bitsandbytes: the production path refuses to run without it.

The format, as bitsandbytes documents and implements it (QLoRA paper, Dettmers et al. 2023, appendix E; the
NF4 table in csrc/kernels.cu `nf4_dequantization_lut`; bitsandbytes/backends/default/ops.py
`quantize_4bit` / `_dequantize_4bit_impl`, read for the rules, not copied):
* the weight is flattened and cut into blocks of `blocksize` values (64 for Linear4bit / Params4bit); each block
  keeps its absmax in fp32 (the last block may be shorter);
* each value / absmax (clamped to [-1, 1]) becomes the index of the nearest of the 16 NF4 code values;
* two indices per byte, the first value of each pair in the high nibble (`q[0::2] << 4 | q[1::2]`), padded with
  code 0.0's index when the count is odd; dequantising is code[index] * absmax of its block.
"""
from __future__ import annotations

import torch

from lora_core.train.quant import NF4Codec

# The 16 NF4 values (QLoRA appendix E; bitsandbytes' nf4 lookup table).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
ZERO_INDEX = 7


class ReferenceNF4(NF4Codec):
    name = "nf4 (pure-torch reference)"

    def __init__(self, blocksize: int = 64):
        self.blocksize = blocksize

    def quantize(self, weight: torch.Tensor):
        flat = weight.detach().float().reshape(-1)
        n, b = flat.numel(), self.blocksize
        blocks = -(-n // b)
        padded = torch.zeros(blocks * b, dtype=torch.float32, device=flat.device)
        padded[:n] = flat
        absmax = padded.view(blocks, b).abs().amax(dim=1)
        scaled = (padded.view(blocks, b) / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-1, 1)
        index = (scaled.reshape(-1, 1) - NF4_CODE.to(flat.device)).abs().argmin(dim=1).to(torch.uint8)[:n]
        if n % 2:
            index = torch.cat([index, torch.tensor([ZERO_INDEX], dtype=torch.uint8, device=flat.device)])
        packed = index[0::2] << 4 | index[1::2]
        return packed, absmax, tuple(weight.shape)

    @staticmethod
    def indices(state) -> torch.Tensor:
        packed, _, shape = state
        out = torch.empty(packed.numel() * 2, dtype=torch.long, device=packed.device)
        out[0::2], out[1::2] = (packed >> 4).long(), (packed & 0xF).long()
        return out[: torch.Size(shape).numel()]

    def dequantize(self, state, dtype):
        packed, absmax, shape = state
        index = self.indices(state)
        n, b = index.numel(), self.blocksize
        values = NF4_CODE.to(packed.device)[index] * absmax.repeat_interleave(b)[:n]
        return values.reshape(shape).to(dtype)

    def nbytes(self, state) -> int:
        packed, absmax, _ = state
        return packed.numel() + absmax.numel() * 4
