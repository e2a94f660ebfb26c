"""Weights that are linears in all but layout, unfolded into ``nn.Linear`` modules (and folded back).

Everything else in lqframe compresses ``nn.Linear`` layers. Two layouts of transformers models hold
linear maps in another form, and :func:`unfold` turns them into linears, in place, before a run
plans its layers:

``experts``
    a mixture-of-experts module of transformers 5 (a class marked with
    ``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss, … 71
    families) keeps every expert's matrices fused in 3-D parameters (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``; transposed, interleaved or with biases in some families, as the
    decorator's flags say). Unfolded, the module holds one child per expert, ``experts.{e}``, with
    the linears ``gate_proj``, ``up_proj`` (``up_proj`` alone for ungated experts) and ``down_proj``
    — the names the experts have on disk in the Qwen/DeepSeek families, in GPTQModel and vLLM — and
    its class becomes :class:`LQExperts` (with the model's own gate function; its activation and norms
    stay). Its forward computes the same routing as the model's
    eager forward, expert by expert, so calibration hooks see exactly the tokens the router sends to
    each expert, and a compressed expert (its linears replaced by ``LQLinear``) runs through the
    kernel entry point like any layer. With :func:`routing_all` every expert also computes on every
    token (its statistics cover all of them; the output still takes only the routed ones, as
    llm-compressor's ``moe_calibrate_all_experts``).
``conv1d``
    transformers' ``Conv1D`` (GPT-2, GPT-J-style and their descendants: ``weight [in, out]``,
    ``y = x·W + b``) becomes the ``nn.Linear`` with ``weight = Wᵀ``: the same function.

The model records what was unfolded (:func:`unfolded`: ``{module name: kind}``); a checkpoint keeps
the record in its ``quantization_config`` and :func:`lqframe.load` / ``from_pretrained`` unfold the
same modules before loading (:func:`unfold` with ``names``). :func:`fold_state` turns a state dict of
the unfolded model back into the model's own layout (the dense export).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lqframe.errors import CheckpointError

__all__ = ["KINDS", "LQExperts", "Expert", "unfold", "unfolded", "routing_all", "fold_state", "experts_layout",
           "is_conv1d", "expert_weight", "fused_name", "stored_tensors", "stored_names"]

KINDS = ("experts", "conv1d")
_RECORD = "_lqframe_unfolded"  # attribute of the model: {module name: kind}


# --------------------------------------------------------------------------- recognising


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (by class name and layout, so no transformers import is needed)."""
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and hasattr(module, "nf"))


def experts_layout(module: nn.Module) -> dict[str, Any] | None:
    """The layout of a fused experts module (``num_experts``, ``has_gate``, ``has_bias``,
    ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``, ``hidden``, ``intermediate``),
    or None for anything else. Only classes transformers marks with ``use_experts_implementation``
    qualify: their flags say how the 3-D parameters are laid out, and their forward takes
    ``(hidden_states, top_k_index, top_k_weights)``."""
    flags = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
    if isinstance(module, LQExperts) or not all(hasattr(module, f) for f in flags):
        return None
    n = getattr(module, "num_experts", None)
    up = module._parameters.get("gate_up_proj" if module.has_gate else "up_proj")
    down = module._parameters.get("down_proj")
    if not isinstance(n, int) or up is None or down is None or up.dim() != 3 or down.dim() != 3:
        return None
    if up.shape[0] != n or down.shape[0] != n:
        return None
    transposed = bool(module.is_transposed)
    hidden = up.shape[1] if transposed else up.shape[2]
    width = up.shape[2] if transposed else up.shape[1]
    intermediate = width // 2 if module.has_gate else width
    return {"num_experts": n, "has_gate": bool(module.has_gate), "has_bias": bool(module.has_bias),
            "is_transposed": transposed, "is_concatenated": bool(module.is_concatenated),
            "has_post_expert_norm": bool(getattr(module, "has_post_expert_norm", False)),
            "hidden": int(hidden), "intermediate": int(intermediate)}


# --------------------------------------------------------------------------- experts


class Expert(nn.Module):
    """One expert's linears: ``gate_proj``, ``up_proj``, ``down_proj`` (no ``gate_proj`` when the
    experts are ungated)."""

    def __init__(self, gate: nn.Module | None, up: nn.Module, down: nn.Module):
        super().__init__()
        if gate is not None:
            self.gate_proj = gate
        self.up_proj = up
        self.down_proj = down


class LQExperts(nn.Module):
    """A fused experts module unfolded into one :class:`Expert` per expert (see module doc). It keeps
    the module's attributes (``act_fn``, norms, the gate's constants) and its class's ``_apply_gate``."""

    #: which tokens each expert computes on: None (those routed to it), ``"all"`` (every token, the
    #: same tensor for every expert: statistics of all tokens) or ``"each"`` (every token, a tensor of
    #: its own per expert: every expert reached on any input, as the input-sharing probe needs); the
    #: output always takes the routed tokens only
    route_all: str | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        mode = self.route_all
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in (range(self.num_experts) if mode else hit):
            if e >= self.num_experts:  # the expert-parallel sentinel
                continue
            token, slot = torch.where(top_k_index == e)
            if mode:
                x = hidden_states if mode == "all" else hidden_states.view(hidden_states.shape)
                y = self.expert_forward(e, x)[token]
            elif token.numel():
                y = self.expert_forward(e, hidden_states[token])
            else:
                continue
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on the tokens ``x`` (unweighted)."""
        expert = self._modules[str(e)]
        if self.has_gate:
            gate, up = expert.gate_proj(x), expert.up_proj(x)
            joined = torch.cat((gate, up), -1) if self.is_concatenated else torch.stack((gate, up), -1).flatten(-2)
            h = self._apply_gate(joined)
        else:
            h = self.act_fn(expert.up_proj(x))
        y = expert.down_proj(h)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        return y


_MIXED: dict[type, type] = {}


def _lq_class(cls: type) -> type:
    """:class:`LQExperts` with the gate function of the model's experts class ``cls`` (not a subclass
    of ``cls``: transformers' weight initialisation would look for the fused parameters)."""
    if cls not in _MIXED:
        _MIXED[cls] = type(f"LQ{cls.__name__}", (LQExperts,), {"__module__": __name__,
                                                                "_apply_gate": cls._apply_gate})
    return _MIXED[cls]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _split_gate_up(w: torch.Tensor, concatenated: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves of a fused gate/up tensor along ``dim`` (concatenated or interleaved)."""
    if concatenated:
        return w.chunk(2, dim=dim)
    index = [slice(None)] * w.dim()
    index[dim] = slice(0, None, 2)
    gate = w[tuple(index)]
    index[dim] = slice(1, None, 2)
    return gate, w[tuple(index)]


def _unfold_experts(module: nn.Module, layout: dict[str, Any]) -> None:
    t = layout["is_transposed"]
    up_name = "gate_up_proj" if layout["has_gate"] else "up_proj"
    up_all = module._parameters.pop(up_name).detach()
    down_all = module._parameters.pop("down_proj").detach()
    up_bias = module._parameters.pop(f"{up_name}_bias").detach() if layout["has_bias"] else None
    down_bias = module._parameters.pop("down_proj_bias").detach() if layout["has_bias"] else None
    for e in range(layout["num_experts"]):
        w_up = up_all[e].T if t else up_all[e]  # out × in
        w_down = down_all[e].T if t else down_all[e]
        b_up = None if up_bias is None else up_bias[e]
        b_down = None if down_bias is None else down_bias[e]
        if layout["has_gate"]:
            g, u = _split_gate_up(w_up, layout["is_concatenated"], 0)
            bg, bu = _split_gate_up(b_up, layout["is_concatenated"], 0) if b_up is not None else (None, None)
            gate = _linear(g.contiguous(), None if bg is None else bg.contiguous())
        else:
            u, bu, gate = w_up, b_up, None
        expert = Expert(gate, _linear(u.contiguous(), None if bu is None else bu.contiguous()),
                        _linear(w_down.contiguous(), None if b_down is None else b_down.contiguous()))
        module.add_module(str(e), expert)
    module.__class__ = _lq_class(type(module))


def _unfold_conv1d(model: nn.Module, name: str, module: nn.Module) -> None:
    from lqframe.pipeline import set_module

    w = module.weight.detach()
    bias = getattr(module, "bias", None)
    set_module(model, name, _linear(w.T.contiguous(), None if bias is None else bias.detach()))


# --------------------------------------------------------------------------- the model


def unfolded(model: nn.Module) -> dict[str, str]:
    """``{module name: kind}`` of what :func:`unfold` changed in ``model`` (empty when nothing)."""
    return dict(getattr(model, _RECORD, None) or {})


def unfold(model: nn.Module, names: Mapping[str, str] | None = None) -> dict[str, str]:
    """Unfold (in place) every fused experts module and every ``Conv1D`` of ``model`` — or, with
    ``names`` (a checkpoint's record), exactly those, each of the recorded kind. Returns the record of
    everything unfolded so far. Works on meta tensors (a skeleton before its weights load)."""
    record = unfolded(model)
    modules = dict(model.named_modules())
    if names is not None:
        todo = []
        for name, kind in names.items():
            if name in record:
                continue
            module = modules.get(name)
            ok = module is not None and (experts_layout(module) is not None if kind == "experts"
                                         else kind == "conv1d" and is_conv1d(module))
            if not ok:
                what = "missing" if module is None else f"a {type(module).__name__}"
                raise CheckpointError(f"the checkpoint unfolds {name!r} as {kind}, and in the "
                                      f"{type(model).__name__} model it is {what}")
            todo.append((name, kind, module))
    else:
        todo = [(n, "experts", m) for n, m in modules.items() if n not in record and experts_layout(m) is not None]
        todo += [(n, "conv1d", m) for n, m in modules.items() if n not in record and is_conv1d(m)]
    for name, kind, module in todo:
        if kind == "experts":
            _unfold_experts(module, experts_layout(module))
        else:
            _unfold_conv1d(model, name, module)
        record[name] = kind
    if record:
        object.__setattr__(model, _RECORD, record)
    return record


@contextlib.contextmanager
def routing_all(model: nn.Module, mode: str | None = "all") -> Iterator[None]:
    """Inside the block every unfolded experts module of ``model`` computes every expert on every
    token (``mode``: ``"all"`` or ``"each"``, see :attr:`LQExperts.route_all`; None: routed tokens)."""
    modules = [m for m in model.modules() if isinstance(m, LQExperts)] if mode else []
    for m in modules:
        m.route_all = mode
    try:
        yield
    finally:
        for m in modules:
            m.route_all = None


def fold_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (tensors named as the unfolded ``model`` names them: ``{layer}.weight`` and
    ``.bias`` for every linear) in the model's own layout: each unfolded experts module's 3-D
    parameters rebuilt from its experts' weights, each Conv1D weight transposed back."""
    out = dict(state)
    for name, kind in unfolded(model).items():
        if kind == "conv1d":
            out[f"{name}.weight"] = out[f"{name}.weight"].T.contiguous()
            continue
        module = model.get_submodule(name)
        n, gated, t = module.num_experts, module.has_gate, module.is_transposed

        def take(e: int, part: str, what: str, _name: str = name) -> torch.Tensor | None:
            return out.pop(f"{_name}.{e}.{part}.{what}", None)

        for what in ("weight", "bias"):
            ups, downs = [], []
            for e in range(n):
                up = take(e, "up_proj", what)
                if gated:
                    gate = take(e, "gate_proj", what)
                    up = None if up is None else (torch.cat((gate, up), 0) if module.is_concatenated
                                                  else torch.stack((gate, up), 1).flatten(0, 1))
                ups.append(up)
                downs.append(take(e, "down_proj", what))
            if any(u is None for u in ups):
                continue
            suffix = "" if what == "weight" else "_bias"
            up_all, down_all = torch.stack(ups), torch.stack(downs)
            if t and what == "weight":
                up_all, down_all = up_all.transpose(1, 2), down_all.transpose(1, 2)
            out[f"{name}.{'gate_up_proj' if gated else 'up_proj'}{suffix}"] = up_all.contiguous()
            out[f"{name}.down_proj{suffix}"] = down_all.contiguous()
    return out


def expert_weight(module: nn.Module, fused: torch.Tensor, e: int, part: str, what: str = "weight") -> torch.Tensor:
    """Expert ``e``'s ``part`` (``gate_proj``, ``up_proj``, ``down_proj``) weight (out × in) or bias, cut
    from the unfolded experts ``module``'s fused tensor of that part as the model's own class stores it
    (``gate_up_proj`` / ``up_proj`` / ``down_proj`` [E, …]: transposed, concatenated or interleaved as
    the module's flags say)."""
    t = fused[e]
    if what == "weight" and module.is_transposed:
        t = t.T
    if part in ("gate_proj", "up_proj") and module.has_gate:
        t = _split_gate_up(t, module.is_concatenated, 0)[0 if part == "gate_proj" else 1]
    return t


def fused_name(module: nn.Module, part: str, what: str = "weight") -> str:
    """The name (relative to the experts module) of the fused tensor an expert's ``part`` is cut from."""
    name = "down_proj" if part == "down_proj" else "gate_up_proj" if module.has_gate else "up_proj"
    return name + ("_bias" if what == "bias" else "")


def stored_tensors(model: nn.Module, names: list[str], reader: Any, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", aliases: Mapping[str, str] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Tensors ``names`` of the unfolded ``model`` from a model folder's weights (``reader``: a
    :class:`lqframe.streaming.ShardReader`), stored in the model's own layout: a Conv1D weight is
    transposed, an expert's linear is read under its own name where the files hold experts one by one
    (``experts.{e}.gate_proj.weight``, the Qwen/DeepSeek layout on disk), under the name transformers
    renames it from (``aliases``: :func:`stored_names`, computed once by the caller), and cut from the
    fused 3-D tensor otherwise."""
    record = unfolded(model)
    aliases = aliases or {}

    def on_disk(name: str) -> str | None:
        return name if name in reader else aliases.get(name)

    keys, cut = {}, []
    for name in names:
        owner, _, what = name.rpartition(".")
        m_e, _, part = owner.rpartition(".")
        experts, _, e = m_e.rpartition(".")
        if on_disk(name) is None and record.get(experts) == "experts" and e.isdigit():
            cut.append((name, experts, int(e), part, what))
        else:
            keys[name] = on_disk(name) or name  # (a name the files lack: the reader's error names it)
    read = reader.get_many(list(keys.values()), dtype, device)
    out = {name: read[key] for name, key in keys.items()}
    for name in keys:
        owner, _, what = name.rpartition(".")
        if record.get(owner) == "conv1d" and what == "weight":
            out[name] = out[name].T.contiguous()
    fused: dict[str, torch.Tensor] = {}
    for name, experts, e, part, what in cut:
        module = model.get_submodule(experts)
        key = f"{experts}.{fused_name(module, part, what)}"
        if key not in fused:
            fused[key] = reader.get(on_disk(key) or key, dtype, device)
        out[name] = expert_weight(module, fused[key], e, part, what).contiguous().clone()
    return out


def stored_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{name in the (unfolded) model: key on disk}`` for the on-disk ``keys`` whose names transformers
    changes when it loads them — its conversion mapping for the model's family: renamed modules
    (Mixtral's ``block_sparse_moe`` → ``mlp``), and experts stored one by one under other names
    (``experts.{e}.w1`` / ``w3`` / ``w2`` → ``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` of the
    unfolded model, read from the sources of transformers' merge of them). Empty when transformers
    has no such mapping (or none it can give for this model)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_renamings

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - an older or newer transformers: names as they are
        return {}
    import re

    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, str] = {}
    for key in keys:
        try:
            renamed = apply_renamings(key, renamings)
        except Exception:  # noqa: BLE001
            continue
        if renamed != key:
            out.setdefault(renamed, key)
        for conv in converters:
            try:
                target, pattern = conv.rename_source_key(renamed)
            except Exception:  # noqa: BLE001
                continue
            if pattern is None:
                continue
            sources = list(conv.source_patterns)
            fused = target.rpartition(".")[2]
            found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
            if found is None or not found.groups() or fused not in ("gate_up_proj", "up_proj", "down_proj"):
                break
            e = found.group(1)
            if fused == "gate_up_proj":
                if len(sources) != 2:
                    break
                part = ("gate_proj", "up_proj")[sources.index(pattern)]
            else:
                part = fused
            suffix = ".bias" if renamed.endswith("bias") else ".weight"
            out.setdefault(f"{target.rpartition('.')[0]}.{e}.{part}{suffix}", key)
            break
    return out
