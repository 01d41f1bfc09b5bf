"""Permutation groups of an open_clip VisionTransformer (the zoo's image towers, CLIP ViT-B/32).

    residual     one permutation for the whole residual stream (patch embedding, class and position
                 embeddings, every LayerNorm, every block's input columns and output rows, `proj`'s rows).
                 LayerNorm normalises over the stream, so only a permutation commutes with it: not zippable.
    b{i}.mlp     the MLP's hidden units (c_fc rows and bias, c_proj columns): zippable.
    b{i}.heads   whole attention heads, compared by what a permutation inside a head leaves unchanged
                 (attention maps; W_qᵀW_k and W_oW_v per head). Heads are permuted, never zipped.
    b{i}.qk      dimensions inside each head of the q and k projections (one permutation for both keeps
                 q·k); they follow the heads' matching.
    b{i}.vo      dimensions inside each head of v and of out_proj's columns; they follow the heads.

The output embedding (`proj`'s columns) is left in place: the zoo's frozen text heads anchor it, so
towers trained apart against the same heads share it. `outputs="aligned"` groups it too.
Recognised structurally (no open_clip import): conv1, class_embedding, positional_embedding,
transformer.resblocks[*] with attn (nn.MultiheadAttention) and mlp.c_fc / mlp.c_proj, ln_post, proj.
"""

from __future__ import annotations

import math

import torch

from merging.errors import MergeyardError
from merging.algorithms.mudsc.spec import Group, Member, PermutationSpec, Probe


def is_vision_transformer(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer",
                                            "ln_post", "proj")) and hasattr(module.transformer, "resblocks")


def _tokens(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(B, T, W) or (T, B, W) activations → (B·T, W) observations."""
    return x.reshape(-1, x.shape[-1]) if batch_first else x.transpose(0, 1).reshape(-1, x.shape[-1])


def _qkv(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ln_1's output x, each (B, T, W) batch first."""
    if not attn.batch_first:
        x = x.transpose(0, 1)
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return q, k, v


def _attention_maps(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """Per head, the attention probabilities over (query, key) token pairs: (B·T·T, heads)."""
    q, k, _ = _qkv(x, attn)
    b, t, w = q.shape
    h = attn.num_heads
    q = q.view(b, t, h, w // h).transpose(1, 2)
    k = k.view(b, t, h, w // h).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // h), dim=-1)  # B, H, T, T
    return probs.permute(0, 2, 3, 1).reshape(-1, h)


def vit_spec(vit: torch.nn.Module, prefix: str = "", outputs: str = "shared") -> PermutationSpec:
    if not is_vision_transformer(vit):
        raise MergeyardError("not an open_clip VisionTransformer (needs conv1, class_embedding, positional_embedding, "
                             "transformer.resblocks, ln_post, proj)")
    blocks = list(vit.transformer.resblocks)
    width = vit.class_embedding.shape[0]
    p = prefix
    res = [Member(f"{p}conv1.weight", 0, "out"), Member(f"{p}class_embedding", 0, "out"),
           Member(f"{p}positional_embedding", 1, "out"), Member(f"{p}ln_pre.weight", 0, "out"),
           Member(f"{p}ln_pre.bias", 0, "out")]
    if getattr(vit.conv1, "bias", None) is not None:
        res.append(Member(f"{p}conv1.bias", 0, "out"))
    res_probes = []
    groups: list[Group] = []
    for i, block in enumerate(blocks):
        attn = block.attn
        if not isinstance(attn, torch.nn.MultiheadAttention) or not getattr(attn, "_qkv_same_embed_dim", True):
            raise MergeyardError(f"block {i}: MuDSC needs nn.MultiheadAttention with one fused in_proj")
        if not all(isinstance(getattr(block, a, None), torch.nn.Identity) for a in ("ls_1", "ls_2")):
            raise MergeyardError(f"block {i}: LayerScale is not supported yet")
        b = f"{p}transformer.resblocks.{i}."
        heads = attn.num_heads
        hidden = block.mlp.c_fc.out_features
        res += [Member(f"{b}ln_1.weight", 0, "out"), Member(f"{b}ln_1.bias", 0, "out"),
                Member(f"{b}attn.in_proj_weight", 1, "in"), Member(f"{b}attn.out_proj.weight", 0, "out"),
                Member(f"{b}attn.out_proj.bias", 0, "out"), Member(f"{b}ln_2.weight", 0, "out"),
                Member(f"{b}ln_2.bias", 0, "out"), Member(f"{b}mlp.c_fc.weight", 1, "in"),
                Member(f"{b}mlp.c_proj.weight", 0, "out"), Member(f"{b}mlp.c_proj.bias", 0, "out")]
        batch_first = bool(attn.batch_first)
        tokens = (lambda bf: lambda x, _m: _tokens(x, bf))(batch_first)
        res_probes += [Probe(f"{b}ln_1", "input", tokens), Probe(f"{b}ln_2", "input", tokens)]
        groups.append(Group(
            f"b{i}.mlp", hidden,
            (Member(f"{b}mlp.c_fc.weight", 0, "out"), Member(f"{b}mlp.c_fc.bias", 0, "out"),
             Member(f"{b}mlp.c_proj.weight", 1, "in")),
            (Probe(f"{b}mlp.c_proj", "input", tokens),)))
        heads_name = f"b{i}.heads"
        # these probes read ln_1's output and apply the attention weights of the model being probed
        path = f"{b}attn"
        groups.append(Group(heads_name, heads, (), (Probe(f"{b}ln_1", "output",
                                                          lambda x, root, path=path: _attention_maps(x, root.get_submodule(path))),),
                            zippable=False, kind="heads", weight_features=_head_weight_features(b, heads, width)))
        qk = lambda path: lambda x, root: torch.cat([t.reshape(-1, t.shape[-1]) for t in _qkv(x, root.get_submodule(path))[:2]])  # noqa: E731
        vo = lambda path: lambda x, root: _qkv(x, root.get_submodule(path))[2].reshape(-1, width)  # noqa: E731
        groups.append(Group(
            f"b{i}.qk", width,
            (Member(f"{b}attn.in_proj_weight", 0, "out", 0), Member(f"{b}attn.in_proj_weight", 0, "out", width),
             Member(f"{b}attn.in_proj_bias", 0, "out", 0), Member(f"{b}attn.in_proj_bias", 0, "out", width)),
            (Probe(f"{b}ln_1", "output", qk(path)),), zippable=False, parent=heads_name))
        groups.append(Group(
            f"b{i}.vo", width,
            (Member(f"{b}attn.in_proj_weight", 0, "out", 2 * width), Member(f"{b}attn.in_proj_bias", 0, "out", 2 * width),
             Member(f"{b}attn.out_proj.weight", 1, "in")),
            (Probe(f"{b}ln_1", "output", vo(path)),), zippable=False, parent=heads_name))
    res += [Member(f"{p}ln_post.weight", 0, "out"), Member(f"{p}ln_post.bias", 0, "out"), Member(f"{p}proj", 0, "in")]
    res_probes.append(Probe(f"{p}ln_post", "input", lambda x, _m: x.reshape(-1, x.shape[-1])))
    spec = PermutationSpec("open_clip.VisionTransformer",
                           [Group("residual", width, tuple(res), tuple(res_probes), zippable=False)] + groups)
    if outputs == "aligned":
        embed = vit.proj.shape[1]
        spec.groups.append(Group("embedding", embed, (Member(f"{p}proj", 1, "out"),),
                                 (Probe(p.rstrip("."), "output", lambda x, _m: x.reshape(-1, x.shape[-1])),)))
    elif outputs != "shared":
        raise MergeyardError(f"outputs {outputs!r}: use shared or aligned")
    return spec


def _head_weight_features(block: str, heads: int, width: int):
    """Per head: W_qᵀ·W_k and W_o·W_v (both width × width in the residual basis), flattened."""
    head_dim = width // heads

    def features(basis) -> torch.Tensor:
        w_in = basis(f"{block}attn.in_proj_weight")  # 3W × W (rows in this model's own order)
        w_out = basis(f"{block}attn.out_proj.weight")  # W × W
        rows = []
        for h in range(heads):
            s = slice(h * head_dim, (h + 1) * head_dim)
            wq, wk = w_in[:width][s], w_in[width:2 * width][s]
            wv = w_in[2 * width:][s]
            rows.append(torch.cat([(wq.T @ wk).reshape(-1), (w_out[:, s] @ wv).reshape(-1)]))
        return torch.stack(rows)

    return features
