"""An independent BERT forward with a fusion, written from the architecture, sharing no code with layerfuse.

It runs the embeddings and then every block by hand, with the classic additive attention mask
(0 for real tokens, the dtype's minimum for padding), and combines `info` into the hidden states
after the fused layer with the given formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FORMULAS: dict[str, Combine] = {
    "addition": lambda h, v: h + v,
    "multiplication": lambda h, v: h * v,
}


def as_broadcast(info: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(H,), (B, H) or (B, T, H) info as a tensor that broadcasts against `like` (B, T, H)."""
    info = info.to(dtype=like.dtype, device=like.device)
    return info[:, None, :] if info.ndim == 2 else info


def bert_forward(model, batch: dict, *, layer: int | None = None, info=None, combine: Combine | None = None, edit=None):
    """Hidden states 0..N of a BERT-family model, fused at `layer` (None: no fusion).

    The fusion is `combine(h, v)` with `info` broadcast, or any `edit(h) -> h`.
    """
    mask = batch["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
    hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    states = []
    for index in range(len(model.encoder.layer) + 1):
        if index > 0:
            output = model.encoder.layer[index - 1](hidden, additive)
            hidden = output[0] if isinstance(output, tuple) else output
        if index == layer:
            hidden = edit(hidden) if edit is not None else combine(hidden, as_broadcast(info, hidden))
        states.append(hidden)
    return states


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def dot(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (h * v).sum(-1, keepdim=True)


def projector(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection matrix onto the row space of `basis` (K, H), as B^T (B B^T)^-1 B."""
    basis = basis.double()
    return (basis.mT @ torch.linalg.inv(basis @ basis.mT) @ basis).float()


def eraser_matrix(info: torch.Tensor) -> torch.Tensor:
    """The (H, H) map P = A·B of eraser info, rows [μ; B; Aᵀ] ((K, H) or (B, K, H)), as one matrix."""
    rank = info.shape[-2] // 2
    return info[..., 1 + rank :, :].mT @ info[..., 1 : 1 + rank, :]


def fixed_formula(name: str, args: dict):
    """The formula of a fixed method as `f(h, v)`, v already broadcast against h (or a basis)."""
    alpha, value = args.get("alpha"), args.get("value", 0.0)
    return {
        "addition": lambda h, v: h + alpha * v,
        "multiplication": lambda h, v: h * v,
        "scale": lambda h, v: alpha * h,
        "replace": lambda h, v: v.expand_as(h),
        "interpolate": lambda h, v: (1 - alpha) * h + alpha * v,
        "ablate": lambda h, v: h - dot(h, unit(v)) * unit(v),
        "clamp": lambda h, v: h - dot(h, unit(v)) * unit(v) + value * unit(v),
        "erase": lambda h, v: h - (h - v[..., :1, :]) @ eraser_matrix(v).mT,
        "project": lambda h, v: (
            h @ projector(v) if v.ndim == 2 else torch.einsum("bth,bhk->btk", h, torch.stack([projector(b) for b in v]))
        ),
    }[name]


def learned_formula(method):
    """The formula of a learned method, from its parameters, as `f(h, v)`."""

    def linear(x, layer):
        return x @ layer.weight.mT + layer.bias

    name = type(method).__name__
    if name == "Film":
        return lambda h, v: h * (1 + linear(v, method.gamma)) + linear(v, method.beta)
    if name == "Concat":
        return lambda h, v: h + linear(torch.cat([h, v.expand(*h.shape[:-1], v.shape[-1])], -1), method.project)
    if name == "Gate":

        def gate(h, v):
            v = v.expand(*h.shape[:-1], v.shape[-1])
            m = torch.relu(linear(torch.cat([h, v], -1), method.gate)) * linear(v, method.project)
            alpha = torch.minimum(
                method.beta * h.norm(dim=-1, keepdim=True) / (m.norm(dim=-1, keepdim=True) + 1e-6), torch.tensor(1.0)
            )
            return h + alpha * m

        return gate
    if name == "CrossAttention":

        def attend(h, v):
            v = v.expand(h.shape[0], *v.shape[-2:])
            heads, size = method.heads, h.shape[-1] // method.heads
            q, k, val = linear(h, method.query), linear(v, method.key), linear(v, method.value)
            out = []
            for i in range(heads):
                part = slice(i * size, (i + 1) * size)
                weights = torch.softmax(q[..., part] @ k[..., part].mT / size**0.5, dim=-1)
                out.append(weights @ val[..., part])
            return h + linear(torch.cat(out, -1), method.output)

        return attend
    raise KeyError(name)


def chosen_positions(positions, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) booleans: which positions a fusion with `positions` changes, from the 2-D attention mask."""
    real = attention_mask.bool()
    batch, length = real.shape
    if isinstance(positions, torch.Tensor):
        return positions
    if isinstance(positions, list):
        chosen = torch.zeros(batch, length, dtype=torch.bool)
        for i in positions:
            chosen[:, i] = True
        return chosen
    if positions == "all":
        return torch.ones(batch, length, dtype=torch.bool)
    if positions == "tokens":
        return real
    chosen = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        indices = [t for t in range(length) if real[row, t]]
        if indices:  # a row of padding has no first or last token
            chosen[row, indices[0] if positions == "first" else indices[-1]] = True
    return chosen


def bert_forward_with_sublayer_edit(model, batch: dict, *, layer: int, site: str, edit):
    """Hidden states 0..N of a BERT, each block written out from its sub-modules, with `edit(h) -> h`
    applied in block `layer` to its input, its attention projection or its feed-forward output."""
    mask = batch["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
    hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    states = [hidden]
    for index, block in enumerate(model.encoder.layer, start=1):
        here = lambda name, h: edit(h) if index == layer and site == name else h
        hidden = here("input", hidden)
        attention = block.attention
        context = attention.self(hidden, additive)[0]
        projected = here("attention", attention.output.dense(context))
        attended = attention.output.LayerNorm(projected + hidden)
        feed = here("mlp", block.output.dense(block.intermediate(attended)))
        hidden = block.output.LayerNorm(feed + attended)
        states.append(hidden)
    return states
