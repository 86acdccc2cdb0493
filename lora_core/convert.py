"""Rename a LoRA file between writers' conventions, for every family the architecture layer knows.

Conventions (`CONVENTIONS`):

* ``kohya``     sd-scripts / musubi names: ``lora_unet_<canonical path _>``, text encoders ``<kohya prefix><HF path _>``
  (``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / Flux's ``lora_te3_`` for T5; ComfyUI's generic
  ``text_encoders.<encoder>.transformer.<HF path>`` where kohya has no name, e.g. Qwen2.5-VL), tensors
  ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``; fused weights stay fused (Flux ``img_attn.qkv``,
  ``linear1``; SD3 ``attn.qkv``), as kohya writes them.
* ``comfy``     ComfyUI's own names (its trainer and LoRA save): ``diffusion_model.<canonical path>`` and
  ``text_encoders.<encoder>.transformer.<HF path>``, same tensor suffixes as kohya.
* ``diffusers`` diffusers / PEFT names (``unet.<diffusers path>`` for UNets, ``transformer.<diffusers path>`` for
  DiTs, ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.`` + HF path), ``lora_A.weight`` /
  ``lora_B.weight``, with ``<module>.alpha`` kept when the source has one (diffusers' network-alpha keys;
  ComfyUI and LoRA Core read it); fused weights are split the way diffusers' classes hold them (``to_q`` /
  ``to_k`` / ``to_v``, ``proj_mlp``, Flux's ``norm_out.linear`` with its rows in [scale, shift] order); a module
  the family knows no diffusers name for keeps ComfyUI's ``diffusion_model.<path>``.

What the file's modules *are* comes from the architecture layer: every name resolves through the family's
KeyMap to a canonical module and the canonical rows it covers; the output convention names each canonical
module (or its parts) again. Tensors are copied unchanged wherever a module maps to one module, and sliced by
rows where a fused module is split (``up`` rows; ``down`` and ``alpha`` unchanged). Fusing parts back into one
module keeps the tensors when the parts share one ``down`` and one alpha (what splitting produced: the round
trip is bit-exact); otherwise the parts are stacked block-wise (``down`` = the parts' downs concatenated,
``up`` block-diagonal), which is exact: the alpha is ``scale * total rank`` when every part has the same
``alpha / rank``, and only when they differ is each part's scale folded into its ``up`` rows (one multiply per
element, alpha = total rank). Splitting a block-stacked module drops the rank columns that are zero on a part's
rows, so split -> fuse -> split gives the original tensors again. Rows of a fused weight no source part covers
stay zero (no change there). Algorithms other than LoRA / LoCon and full diffs (LoHa, LoKr, OFT, ...) are
renamed module for module; splitting or fusing them has no exact form and is refused, naming the module.

Metadata is carried over unchanged, plus ``lora_core.convert`` (JSON: from, to, family variant).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import LoraMatchError, LoraValueError
from .arch.family import param_key
from .formats import parse_modules, split_key
from .types import LoraFile

CONVENTIONS = ("kohya", "diffusers", "comfy")
_ROW_ALGOS = ("lora", "full")
_SUFFIX = {
    "kohya": {"up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight"},
    "comfy": {"up": ".lora_up.weight", "down": ".lora_down.weight", "mid": ".lora_mid.weight"},
    "diffusers": {"up": ".lora_B.weight", "down": ".lora_A.weight", "mid": ".lora_mid.weight"},
}
_COMMON = {"alpha": ".alpha", "diff": ".diff", "diff_b": ".diff_b", "dora_scale": ".dora_scale"}


@dataclass
class ConvertResult:
    tensors: dict
    metadata: dict
    arch: object
    to: str
    modules_in: int = 0
    modules_out: int = 0
    split: int = 0          # source modules split into parts
    fused: int = 0          # output modules made of several source modules
    rescaled: int = 0       # fused modules whose parts' scales were folded into up
    notes: list = field(default_factory=list)
    path: Optional[str] = None

    def text(self) -> str:
        lines = [f"LoRA Core convert to {self.to}: {self.modules_in} modules in, {self.modules_out} out "
                 f"({self.arch.title})"]
        if self.path:
            lines.append(f"  saved: {self.path}")
        if self.split:
            lines.append(f"  split fused modules: {self.split} (up rows sliced; down and alpha kept)")
        if self.fused:
            lines.append(f"  fused modules: {self.fused}" + (f" ({self.rescaled} with per-part scales folded "
                                                             f"into up)" if self.rescaled else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"path": self.path, "to": self.to, "arch": self.arch.name, "modules_in": self.modules_in,
                "modules_out": self.modules_out, "split": self.split, "fused": self.fused,
                "rescaled": self.rescaled, "notes": self.notes}

    def save(self, path, overwrite: bool = False) -> str:
        from .io import save_lora_file

        self.path = save_lora_file(path, self.tensors, self.metadata, overwrite=overwrite)
        return self.path


@dataclass
class _Source:
    name: str
    algo: str
    roles: dict          # role -> (file key, tensor)
    coverage: tuple      # ((canonical start, module start, length), ...); None = the whole module
    target: object


# ------------------------------------------------------------------------------------------- output names

def _diffusers_table(arch, config) -> dict:
    """canonical path -> [(diffusers module path, pieces or None)] for weights."""
    table: dict = {}
    family = arch.family
    for key, (canonical, pieces, param) in family.diffusers_host_pieces(config, arch).items():
        if param != "weight" or not key.endswith(".weight"):
            continue
        entries = table.setdefault(canonical, [])
        name = key[: -len(".weight")]
        if pieces is None:
            if not any(p is None for _, p in entries):   # two spellings: the first wins
                entries.append((name, None))
        else:
            entries.append((name, tuple(pieces)))
    return table


def _outputs(target, key_map, arch, to: str, table) -> list[tuple[str, Optional[tuple]]]:
    """[(output module name, pieces ((canonical start, output start, length), ...) or None = whole)]."""
    from .mix import output_name

    component, path = target.component, target.path
    if target.param != "weight":
        return [(f"diffusion_model.{param_key(path, target.param)}", None)]
    if component.startswith("te"):
        spec = key_map.component_specs.get(component) or arch.components.get(component)
        encoder = spec.encoder if spec is not None else None
        if to == "kohya":
            return [(output_name(target, key_map, arch), None)]
        if to == "diffusers" and spec is not None and spec.diffusers_prefix:
            return [(spec.diffusers_prefix + path, None)]
        if encoder is None:
            raise LoraMatchError(f"cannot name text-encoder module {path}: the encoder of {component} is unknown.")
        return [(f"text_encoders.{encoder.comfy_name}.transformer.{path}", None)]
    if to == "kohya":
        return [(output_name(target, key_map, arch), None)]
    if to == "comfy":
        return [(f"diffusion_model.{path}", None)]
    prefix = "unet." if arch.family.denoiser == "unet" else "transformer."
    entries = table.get(path)
    if not entries:
        # no diffusers name for it (e.g. Chroma's distilled_guidance_layer in the family's table): ComfyUI's name,
        # which every loader reads, rather than an invented one
        return [(f"diffusion_model.{path}", None)]
    return [(prefix + name, pieces) for name, pieces in entries]


# ------------------------------------------------------------------------------------------- the conversion

def _sources(lora: LoraFile, key_map) -> tuple[dict, list]:
    """{(component, path): [_Source]} in file order, and the names no layout resolves."""
    parsed = parse_modules(lora)
    if parsed.unused:
        key, why = parsed.unused[0]
        raise LoraValueError(f"{lora.label}: {len(parsed.unused)} keys cannot be converted because LoRA Core does not "
                             f"understand them (e.g. {key}: {why}). Remove them or fix the file.")
    raw: dict = {}
    for key, tensor in lora.tensors.items():
        split = split_key(key)
        if split is None:
            continue
        module, role, _ = split
        raw.setdefault(module, {})[role] = (key, tensor)
    grouped: dict = {}
    unmatched = []
    for name, module in parsed.modules.items():
        target = key_map.resolve(name)
        if target is None:
            unmatched.append((name, key_map.explain_unmatched(name)))
            continue
        roles = {r: raw[name][r] for r in raw.get(name, {})}
        if not roles:   # a processor-form name (diffusers' old attention processors) renamed by the parser
            roles = {split_key(k)[1]: (k, lora.tensors[k]) for k in module.source_keys}
        coverage = None if target.pieces is None else tuple((p.dst, p.src, p.length) for p in target.pieces)
        grouped.setdefault((target.component, target.path), []).append(
            _Source(name, module.algo + ("+dora" if module.dora_scale is not None else ""), roles, coverage, target))
    return grouped, unmatched


def naming_arch(lora: LoraFile):
    """The variant whose names a file uses: `detect_lora` (metadata, keys, shape votes); when that cannot decide
    between variants that name every module alike (SD1 / SD2, the SD3 sizes, a tiny or pruned model), the first
    variant of the one family whose layouts resolve most of the file's names - for renaming, the variants of a
    family are interchangeable where their names agree."""
    from .arch import ARCHS, detect_lora, layout_key_map

    spec = detect_lora(lora)
    if spec is not None:
        return spec
    names = list(parse_modules(lora).modules)
    counts = {name: sum(1 for n in names if layout_key_map(name).resolve(n) is not None) for name in ARCHS}
    best = max(counts.values(), default=0)
    winners = [ARCHS[n] for n, c in counts.items() if c == best]
    families = {w.family for w in winners}
    if best == 0 or len(families) > 1 or best < 0.5 * len(names):
        raise LoraMatchError(f"{lora.label}: cannot tell which model family the file's names belong to "
                             f"({', '.join(sorted(w.name for w in winners)) if best else 'none resolves'}); pass "
                             f"--family (sd1, sdxl, flux, chroma, sd3, qwen, ...).")
    return winners[0]


def convert_lora(lora: LoraFile, to: str, arch=None, key_map=None) -> ConvertResult:
    """The same LoRA in convention `to` (see the module docstring). `arch` forces the variant ("flux", "sdxl",
    ...); by default it is read from the file's metadata and keys. `key_map` (a model's, e.g.
    `checkpoint.bind_source(open_checkpoint(path))`) replaces the full-size layout: the model's own depth and
    widths decide (an SD3 model's last block, whose context modulation diffusers stores swapped, is its own)."""
    from .arch import get_arch, layout_key_map

    to = str(to).strip().lower()
    if to not in CONVENTIONS:
        raise LoraValueError(f"unknown target convention {to!r}; use one of {', '.join(CONVENTIONS)}.")
    if key_map is not None and key_map.arch is not None:
        spec = key_map.arch
    else:
        spec = get_arch(arch) if arch not in (None, "", "auto") else naming_arch(lora)
        key_map = layout_key_map(spec)
    grouped, unmatched = _sources(lora, key_map)
    if unmatched:
        name, why = unmatched[0]
        raise LoraMatchError(f"{lora.label}: {len(unmatched)} modules name no module of {spec.title} and cannot be "
                             f"converted (e.g. {name}: {why}). Pass the right --family, or remove them.")
    table = _diffusers_table(spec, key_map.config or spec.config) if to == "diffusers" else {}
    result = ConvertResult({}, {}, spec, to, modules_in=sum(len(v) for v in grouped.values()))
    for (_component, _path), sources in grouped.items():
        whole = key_map.module_target(sources[0].target.component, sources[0].target.path) or sources[0].target
        outputs = _outputs(whole, key_map, spec, to, table)
        _convert_module(sources, whole, outputs, to, result)
    meta = dict(lora.metadata)
    meta["lora_core.convert"] = json.dumps({"from": parse_modules(lora).writer, "to": to, "arch": spec.name})
    result.metadata = meta
    return result


def _rename(source: _Source, out_name: str, to: str, result: ConvertResult) -> None:
    for role, (key, tensor) in source.roles.items():
        own = key[len(source.name):] if key.startswith(source.name) else "." + key.rsplit(".", 1)[-1]
        suffix = _SUFFIX[to].get(role) or _COMMON.get(role) or own   # LoHa, LoKr, ... keep their tensor names
        _put(result, out_name + suffix, tensor)


def _put(result: ConvertResult, key: str, tensor: torch.Tensor) -> None:
    if key in result.tensors:
        raise LoraValueError(f"two modules of the file become {key}: the file holds one module twice under "
                             f"different names. Remove one of them.")
    result.tensors[key] = tensor


def _whole_pieces(target, coverage):
    rows = target.rows
    return coverage if coverage is not None else ((0, 0, rows),)


def _convert_module(sources, whole, outputs, to: str, result: ConvertResult) -> None:
    single_whole_out = len(outputs) == 1 and outputs[0][1] is None
    if len(sources) == 1 and sources[0].coverage is None and single_whole_out:
        _rename(sources[0], outputs[0][0], to, result)
        result.modules_out += 1
        return
    rows = whole.rows
    for s in sources:
        if s.algo not in _ROW_ALGOS:
            raise LoraValueError(f"{s.name}: a {s.algo} module covers part of the fused weight {whole.path} (or is "
                                 f"split into parts in the {to} convention); only LoRA/LoCon and full diffs can be "
                                 f"split or fused exactly. Convert to a convention that keeps {whole.path} as one "
                                 f"module (kohya or comfy).")
        if "mid" in s.roles and to == "diffusers":
            raise LoraValueError(f"{s.name}: Tucker (lora_mid) modules have no diffusers form; convert to kohya or comfy.")
    if rows <= 0:
        raise LoraValueError(f"{whole.path}: several modules of the file patch it; cannot tell their rows apart.")
    # The layout is the full-size model's; a file for a narrower model of the family (a pruned or distilled one)
    # has every part narrower by one factor: read it off the file and scale the row ranges.
    factor = _width_factor(sources, whole)
    if factor != 1:
        rows = _scaled_rows(rows, factor, whole.path)
        sources = [_Source(s.name, s.algo, s.roles, None if s.coverage is None else
                           tuple(tuple(_scaled_rows(x, factor, whole.path) for x in piece) for piece in s.coverage), s.target)
                   for s in sources]
        outputs = [(name, None if pieces is None else
                    tuple(tuple(_scaled_rows(x, factor, whole.path) for x in piece) for piece in pieces))
                   for name, pieces in outputs]
    if len({s.algo for s in sources}) > 1:
        raise LoraValueError(f"{whole.path}: its parts mix algorithms ({', '.join(s.name for s in sources)}); they "
                             f"cannot be fused into one module.")
    if len(sources) > 1 and any(o[1] is None for o in outputs):
        result.fused += 1
    if any(s.coverage is None for s in sources) and any(o[1] is not None for o in outputs):
        result.split += 1
    for out_name, out_pieces in outputs:
        out_pieces = out_pieces if out_pieces is not None else ((0, 0, rows),)
        out_rows = sum(n for _, _, n in out_pieces)
        # for each source: (output row, source row, count) pairs
        maps = []
        for s in sources:
            pairs = []
            for oc, oo, on in out_pieces:
                for sc, ss, sn in _whole_pieces(whole, s.coverage):
                    lo, hi = max(oc, sc), min(oc + on, sc + sn)
                    if lo < hi:
                        pairs.append((oo + lo - oc, ss + lo - sc, hi - lo))
            if pairs:
                maps.append((s, tuple(sorted(pairs))))
        if not maps:
            continue   # no source touches this part: no module (no change there)
        if sources[0].algo == "full":
            _emit_full(out_name, out_rows, maps, result)
        else:
            _emit_lora(out_name, out_rows, maps, to, result)
        result.modules_out += 1


def _module_rows(source) -> int:
    tensor = source.roles["up"][1] if "up" in source.roles else source.roles["diff"][1]
    return int(tensor.shape[0])


def _width_factor(sources, whole):
    from fractions import Fraction

    factors = set()
    for s in sources:
        expected = whole.rows if s.coverage is None else sum(n for _, _, n in s.coverage)
        factors.add(Fraction(_module_rows(s), expected))
    if len(factors) > 1:
        raise LoraValueError(f"{whole.path}: the file's modules for it have widths of different models "
                             f"({', '.join(f'{s.name}: {_module_rows(s)} rows' for s in sources)}).")
    return factors.pop()


def _scaled_rows(value: int, factor, path: str) -> int:
    scaled = value * factor
    if scaled.denominator != 1:
        raise LoraValueError(f"{path}: the file's width does not split into this family's parts (rows {value} x "
                             f"{factor}); pass the right --family.")
    return int(scaled)


def _rows_of(tensor: torch.Tensor, out_rows: int, pairs) -> torch.Tensor:
    """Rows of `tensor` placed at output rows (the tensor itself when the pairs are the identity)."""
    if len(pairs) == 1 and pairs[0] == (0, 0, out_rows) and tensor.shape[0] == out_rows:
        return tensor
    if len(pairs) == 1 and pairs[0][2] == out_rows:
        _, src, n = pairs[0]
        return tensor[src:src + n]
    placed = torch.zeros((out_rows, *tensor.shape[1:]), dtype=tensor.dtype)
    for dst, src, n in pairs:
        placed[dst:dst + n] = tensor[src:src + n]
    return placed


def _emit_full(out_name, out_rows, maps, result) -> None:
    diffs = [(s.roles["diff"][1], pairs) for s, pairs in maps]
    if len(diffs) == 1:
        _put(result, out_name + ".diff", _rows_of(diffs[0][0], out_rows, diffs[0][1]))
    else:
        tensor = torch.zeros((out_rows, *diffs[0][0].shape[1:]), dtype=diffs[0][0].dtype)
        for diff, pairs in diffs:
            for dst, src, n in pairs:
                tensor[dst:dst + n] = diff[src:src + n]
        _put(result, out_name + ".diff", tensor)
    _emit_bias(out_name, out_rows, maps, result)


def _emit_bias(out_name, out_rows, maps, result) -> None:
    biases = [(s.roles["diff_b"][1], pairs) for s, pairs in maps if "diff_b" in s.roles]
    if not biases:
        return
    tensor = torch.zeros(out_rows, dtype=biases[0][0].dtype)
    if len(biases) == 1:
        tensor = _rows_of(biases[0][0], out_rows, biases[0][1])
    else:
        for bias, pairs in biases:
            for dst, src, n in pairs:
                tensor[dst:dst + n] = bias[src:src + n]
    _put(result, out_name + ".diff_b", tensor)


def _alpha(source) -> Optional[torch.Tensor]:
    item = source.roles.get("alpha")
    return item[1] if item is not None else None


def _scale(source) -> float:
    alpha = _alpha(source)
    rank = source.roles["down"][1].shape[0]
    return float(alpha) / rank if alpha is not None else 1.0


def _emit_lora(out_name, out_rows, maps, to: str, result) -> None:
    suffix = _SUFFIX[to]
    if len(maps) == 1:
        s, pairs = maps[0]
        up, down = s.roles["up"][1], s.roles["down"][1]
        alpha = _alpha(s)
        placed = _rows_of(up, out_rows, pairs)
        mid = s.roles.get("mid")
        if mid is None and placed is not up:
            # a block-stacked source: keep only the rank columns that act on these rows
            flat = placed.reshape(out_rows, placed.shape[1], -1)
            used = torch.nonzero(flat.abs().amax(dim=(0, 2)) > 0).flatten()
            if 0 < used.numel() < up.shape[1]:
                cols = used.tolist()
                placed = placed[:, cols]
                down = down[cols]
                if alpha is not None:
                    alpha = (alpha.float() * (len(cols) / up.shape[1])).to(alpha.dtype)
        _put(result, out_name + suffix["up"], placed)
        _put(result, out_name + suffix["down"], down)
        if mid is not None:
            _put(result, out_name + suffix["mid"], mid[1])
        if alpha is not None:
            _put(result, out_name + ".alpha", alpha)
        if "dora_scale" in s.roles:
            raise LoraValueError(f"{s.name}: a DoRA module cannot be split or fused exactly.")
        _emit_bias(out_name, out_rows, maps, result)
        return
    sources = [s for s, _ in maps]
    if any("mid" in s.roles or "dora_scale" in s.roles for s in sources):
        raise LoraValueError(f"{out_name}: parts with Tucker cores or DoRA cannot be fused into one module.")
    downs = [s.roles["down"][1] for s in sources]
    alphas = [_alpha(s) for s in sources]
    same_down = all(d.shape == downs[0].shape and d.dtype == downs[0].dtype and torch.equal(d, downs[0])
                    for d in downs)
    same_alpha = all((a is None) == (alphas[0] is None) and (a is None or torch.equal(a, alphas[0])) for a in alphas)
    ups = [s.roles["up"][1] for s in sources]
    dtype = max((u.dtype for u in ups), key=lambda d: torch.finfo(d).bits)
    if same_down and same_alpha:
        # parts of one module that was split: the original up rows under one shared down
        up = torch.zeros((out_rows, *ups[0].shape[1:]), dtype=dtype)
        for (s, pairs), u in zip(maps, ups):
            for dst, src, n in pairs:
                up[dst:dst + n] = u[src:src + n]
        _put(result, out_name + suffix["up"], up)
        _put(result, out_name + suffix["down"], downs[0])
        if alphas[0] is not None:
            _put(result, out_name + ".alpha", alphas[0])
    else:
        ranks = [d.shape[0] for d in downs]
        total = sum(ranks)
        scales = [_scale(s) for s in sources]
        up = torch.zeros((out_rows, total, *ups[0].shape[2:]), dtype=dtype)
        column = 0
        equal = all(x == scales[0] for x in scales)
        for (s, pairs), u, r, scale in zip(maps, ups, ranks, scales):
            for dst, src, n in pairs:
                part = u[src:src + n].to(dtype)
                up[dst:dst + n, column:column + r] = part if equal else (part.float() * scale).to(dtype)
            column += r
        if not equal:
            result.rescaled += 1
        ddtype = max((d.dtype for d in downs), key=lambda d: torch.finfo(d).bits)
        _put(result, out_name + suffix["up"], up)
        _put(result, out_name + suffix["down"], torch.cat([d.to(ddtype) for d in downs], 0))
        if equal and all(a is None for a in alphas):
            pass   # scale 1 without alphas, as the parts had
        else:
            alpha_dtype = next((a.dtype for a in alphas if a is not None), torch.float32)
            _put(result, out_name + ".alpha", torch.tensor(scales[0] * total if equal else float(total),
                                                           dtype=alpha_dtype))
    _emit_bias(out_name, out_rows, maps, result)


def convert_file(path, to: str, arch=None) -> ConvertResult:
    from .io import read_lora_file

    return convert_lora(read_lora_file(path), to, arch)
