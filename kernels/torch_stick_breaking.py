"""Torch implementation of stick-breaking attention in O(T*S): blocked, log-space, fp32, recompute backward.

The dispatcher is :func:`kernels.stick_breaking.stick_breaking_attention`; this module holds the torch path only.

Definition (moduleformer-architecture.md §4), for one (batch, query set, head), query row i, key j <= i:

    l_ij = scale * q_i . k_j,   z_ij = sigmoid(l_ij)
    A_ij = z_ij * prod_{j < m <= i} (1 - z_im)          (diagonal included, no remainder term)
    out_i = sum_j A_ij v_j

In log space ``log A_ij = l_ij - sum_{j <= m <= i} softplus(l_im)`` (since log z = l - softplus(l) and
log(1 - z) = -softplus(l)): the logit minus an *inclusive reverse* cumulative sum, i.e. the stick is broken from
the diagonal backwards. Every log A <= 0, so no running max is needed (unlike softmax).

How it is evaluated (flash-style, torch ops only):

- K/V are stored **reversed in time** once (``kr[j'] = k[S-1-j']``), so the reverse cumulative sum becomes a
  forward ``torch.cumsum`` along the contiguous last dim (fast on CPU; cumsum along other dims is ~30x slower).
- Queries are processed in row blocks of ``block_size`` positions; the K query sets of a position are merged into
  the row dimension, so one K/V head serves ``K * block_size`` rows in one batched matmul (no K/V copies).
- For a row block, key chunks are visited from the diagonal backwards (in reversed order: forwards). The first
  chunk is the diagonal triangle (the only masked one); the running per-row sum of softplus is carried from chunk
  to chunk by adding it to the first column before the in-chunk cumsum (never ``total - cumsum``).
- Logits are kept in base 2 (``L = l / ln 2``, folded into the query scale) because ``exp2`` is ~2x faster than
  ``exp`` on CPU; ``softplus(l) = log1p(2**L)`` keeps full relative precision for tiny z.
- Both exponentials are evaluated on clamped arguments: ``|L| <= 100`` before ``2**L`` (no overflow; beyond that z
  is 0 or 1 in fp32 anyway) and ``log2 A >= -100``: a weight is at least 2**-100, so neither ``2**x`` nor the
  products ``A * v`` inside the A.V GEMM (for |v| >= 2**-26) are denormal. Denormals take the CPU's slow path: with
  the earlier floor of 2**-125 the used-up sticks' weights made the products denormal, and on an Intel Xeon VM the
  forward took 139 ms instead of 13 ms at T=1024 (same outputs bit for bit). A floored weight contributes at most
  ``S * 2**-100 * max|v|`` to an output (1e-24 for S = 1e5, |v| <= 10): nothing at fp32 resolution. Masked
  entries are zeroed exactly by multiplication, so causal/padded weights are exactly 0 and a fully masked row
  yields exact zeros.
- Underflow skip (CPU default): a row block stops walking back once, for all its rows, the carried sum alone
  pushes every remaining log2 A below -100 (bound |L| <= |q_i| max|k_j| by Cauchy-Schwarz). Those weights are
  below 2**-100, so the result changes by at most the bound above; with sticks that run out after a few hundred
  keys (random inputs, typical trained heads) the cost drops from O(T*S) to O(T * stick length).
- Decode (T <= 4 query positions) takes a direct path: one [B, H, T*K, S] logit tensor on K/V as they are
  (no reversed copies), reverse cumsum by flip/cumsum/flip, plain autograd.
- Everything is computed in fp32 (fp64 for fp64 inputs) whatever the input dtype; memory is
  O((T*K + S) * H * D + B*H * K*block_size * key_block_size). The autograd path saves q, k, v, the mask and
  the fp32 output (an extra fp32 copy only for bf16/fp16 inputs). Forward and backward of the blocked path are
  ``torch.library`` custom ops (``moduleformer::stick_breaking_fwd`` / ``_bwd``), so torch.compile and
  torch.export trace around them.

Backward (custom autograd Function, memory-linear): recomputes A chunk by chunk in the same order as the forward
(same carries, so the same A), with

    dA_ij = do_i . v_j,   g_ij = dA_ij A_ij,   dl_ij = g_ij - z_ij * sum_{m <= j} g_im,

where the prefix sum over keys *behind* j is ``G_i - sum_{m > j} g_im`` and ``G_i = sum_m g_im = do_i . out_i``
(known before the pass, as FlashAttention's ``rowsum(dO * O)``); the suffix part is the running sum of the chunks
already visited. Then dq = scale * dl k, dk = scale * dl^T q, dv = A^T do.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .backend import tracing
from .checks import check_attention_mask, check_attention_shapes

__all__ = ["torch_stick_breaking_attention", "head_major_stick_breaking", "DIRECT_MAX_T"]

_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2
_L_CLAMP = 100.0  # |log2-logit| bound: 2**100 is finite, and z is exactly 0/1 in fp32 far before that
_LOGA_MIN = -100.0  # weight floor: 2**-100 * |v| stays a normal fp32 for |v| >= 2**-26 (see the module docstring)
_CHUNK_ELEMS = 1 << 17  # target elements of one [B*H, rows, keys] chunk for short row blocks (decode)
_DEFAULT_KEY_BLOCK = 128
_SKIP_MARGIN = 1.0  # slack (log2 units) on the underflow bound, covers fp32 rounding of the bound itself
DIRECT_MAX_T = 4  # query positions up to which the un-blocked decode path is used
_DIRECT_MAX_T = DIRECT_MAX_T


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Prepared:
    """Re-laid-out operands shared by forward and backward (all contiguous, compute dtype).

    qf: [B*H, T*K, D] query rows ordered (t, k), pre-scaled by scale/ln2 (base-2 logits).
    kr, vr: [B*H, S, D] keys/values reversed in time (kr[:, j'] = k[:, S-1-j']).
    keep_r: [B, S] 0/1 float, reversed, or None when nothing is masked.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float):
        B, T, K, H, D = q.shape
        S = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        self.shape = (B, T, K, H, D, S)
        self.dtype = cdt
        qf = torch.empty(B, H, T, K, D, dtype=cdt, device=q.device)
        if q.dtype == cdt:
            torch.mul(q.permute(0, 3, 1, 2, 4), scale * _INV_LN2, out=qf)  # one strided pass: permute + scale
        else:  # cast first: a python-scalar multiply would run (and round) in bf16/fp16
            qf.copy_(q.permute(0, 3, 1, 2, 4)).mul_(scale * _INV_LN2)
        self.qf = qf.view(B * H, T * K, D)
        self.kr = k.to(cdt).permute(0, 2, 1, 3).reshape(B * H, S, D).flip(1)
        self.vr = v.to(cdt).permute(0, 2, 1, 3).reshape(B * H, S, D).flip(1)
        self.keep_r = None if keep is None else keep.to(cdt).flip(1).contiguous()
        self._bound = None
        qn, kmax = self.key_bound()
        # |L| <= max|qf| * max|kr|: when that is within the clamp range the clamp pass is a no-op (usual case)
        self.needs_clamp = T * K > 0 and S > 0 and (tracing() or bool(qn.max() * kmax[:, 0].max() > _L_CLAMP - 1.0))

    def key_bound(self) -> Tuple[Tensor, Tensor]:
        """(|qf| per row [B*H, T*K], max |kr| over reversed keys >= j' [B*H, S]): |L_ij| <= product."""
        if self._bound is None:
            kn = self.kr.norm(dim=-1)
            self._bound = (self.qf.norm(dim=-1), kn.flip(1).cummax(1).values.flip(1))
        return self._bound


def _row_blocks(T: int, block: int) -> Iterator[Tuple[int, int]]:
    for r1 in range(T, 0, -block):
        yield max(0, r1 - block), r1


def _key_chunks(T: int, S: int, r0: int, r1: int, kb: int) -> Iterator[Tuple[int, int]]:
    """Reversed-key ranges for query rows [r0, r1): the diagonal triangle first, then chunks of kb keys.

    Query row r (absolute position S-T+r) sees reversed keys j' >= T-1-r, so the rows of the block jointly start
    at T-r1; [T-r1, T-r0) is the partly masked triangle, [T-r0, S) is fully visible.
    """
    yield T - r1, T - r0
    for j0 in range(T - r0, S, kb):
        yield j0, min(S, j0 + kb)


def _diag_keep(nb: int, K: int, BH: int, dtype: torch.dtype, device) -> Tensor:
    """[B*H, nb*K, nb] 0/1: row i (rows ordered (t, k)) of a block sees reversed-local key c iff c >= nb-1-i."""
    i = torch.arange(nb, device=device).repeat_interleave(K)[:, None]
    c = torch.arange(nb, device=device)[None, :]
    return (c >= nb - 1 - i).to(dtype).expand(BH, nb * K, nb).contiguous()


def _key_block_for(rows: int, BH: int, key_block: Optional[int]) -> int:
    """key_block if given; else 128, raised for short row blocks (decode, small T) so per-op overhead amortises."""
    if key_block is not None:
        return key_block
    want = -(-_CHUNK_ELEMS // max(1, BH * rows))
    return max(_DEFAULT_KEY_BLOCK, -(-want // 64) * 64)


def _log_weights(p: _Prepared, qb: Tensor, j0: int, j1: int, L: Tensor, sp: Tensor, carry: Optional[Tensor],
                 keep: Optional[Tensor], B: int, H: int, z: Optional[Tensor] = None) -> Tensor:
    """Fill L with A = exp(log A) for reversed keys [j0, j1) and return the new per-row carry.

    L, sp: [B*H, M, n] scratch. carry: [B*H, M] sum of softplus over the chunks already visited (None for the
    first). keep: [B*H, M, n] 0/1 causal mask of the diagonal chunk or None. z (backward only): receives
    sigmoid(l), zero where masked. Returns a view of sp's last column (valid until sp is overwritten).
    """
    BH, M, n = L.shape
    torch.bmm(qb, p.kr[:, j0:j1].transpose(1, 2), out=L)  # base-2 logits
    if p.needs_clamp:
        L.clamp_(-_L_CLAMP, _L_CLAMP)
    torch.exp2(L, out=sp)
    sp.log1p_()  # softplus(l) = -log(1 - z) >= 0
    pad = None
    if p.keep_r is not None:
        pad = p.keep_r[:, None, None, j0:j1]  # [B, 1, 1, n]
        sp.view(B, H, M, n).mul_(pad)  # masked key: does not break the stick
    if keep is not None:
        sp.mul_(keep)
    if z is not None:  # z = exp(l - softplus(l)), in (0, 1]
        torch.sub(L, sp, alpha=_INV_LN2, out=z).exp2_()
        if keep is not None:
            z.mul_(keep)
        if pad is not None:
            z.view(B, H, M, n).mul_(pad)
    if carry is not None:
        sp[:, :, 0].add_(carry)  # fold the running sum in: the cumsum then carries it to every column
    torch.cumsum(sp, -1, out=sp)
    torch.sub(L, sp, alpha=_INV_LN2, out=L)  # log2 A = L - cs / ln2 <= 0
    L.clamp_(min=_LOGA_MIN).exp2_()
    if keep is not None:
        L.mul_(keep)
    if pad is not None:
        L.view(B, H, M, n).mul_(pad)
    return sp[:, :, -1]


def _all_underflow(p: _Prepared, carry: Tensor, r0: int, r1: int, j: int) -> bool:
    """True if every weight of rows [r0, r1) on reversed keys >= j is below 2**_LOGA_MIN (2**-100).

    log2 A = L - cs/ln2 with cs >= carry and L <= min(100, |qf_i| * max_{j' >= j} |kr_j'|) (Cauchy-Schwarz).
    Skipping those chunks changes the output by less than S * 2**-100 * max|v|: nothing at fp32 resolution.
    """
    if tracing():  # a data-dependent early stop cannot be traced: walk every chunk (same result)
        return False
    qn, kmax = p.key_bound()
    K = p.shape[2]
    bound = (qn[:, r0 * K:r1 * K] * kmax[:, j:j + 1]).clamp_(max=_L_CLAMP)
    return bool(((carry * _INV_LN2 - bound).amin() > -_LOGA_MIN + _SKIP_MARGIN).item())


def _forward(p: _Prepared, block: int, key_block: Optional[int], skip: bool = True) -> Tuple[Tensor, list]:
    """Returns (out [B, T, K, H, D] in the compute dtype, number of key chunks visited per row block)."""
    B, T, K, H, D, S = p.shape
    BH = B * H
    dev, cdt = p.qf.device, p.dtype
    out = torch.empty(B, T, K, H, D, dtype=cdt, device=dev)
    out_v = out.view(B, T * K, H, D).permute(0, 2, 1, 3)  # [B, H, T*K, D] view of the final layout
    nb_max = min(block, T)
    kb = _key_block_for(nb_max * K, BH, key_block)
    width = min(max(kb, nb_max), S)  # longest chunk: the diagonal one or a key chunk, never beyond S
    rows = nb_max * K
    L_buf = torch.empty(BH * rows * width, dtype=cdt, device=dev)
    sp_bufs = (torch.empty_like(L_buf), torch.empty_like(L_buf))  # alternate so the carry view stays valid
    o_buf = torch.empty(BH * rows * D, dtype=cdt, device=dev)
    keeps = {}
    chunks = []
    for r0, r1 in _row_blocks(T, block):
        nb = r1 - r0
        M = nb * K
        if nb not in keeps:
            keeps[nb] = _diag_keep(nb, K, BH, cdt, dev)
        qb = p.qf[:, r0 * K:r1 * K]
        ob = o_buf[:BH * M * D].view(BH, M, D)
        carry = None
        visited = 0
        for c, (j0, j1) in enumerate(_key_chunks(T, S, r0, r1, kb)):
            if skip and c > 0 and _all_underflow(p, carry, r0, r1, j0):
                break  # the stick of every row is used up: the remaining weights are all 0 in fp32
            n = j1 - j0
            L = L_buf[:BH * M * n].view(BH, M, n)
            sp = sp_bufs[c & 1][:BH * M * n].view(BH, M, n)
            carry = _log_weights(p, qb, j0, j1, L, sp, carry, keeps[nb] if c == 0 else None, B, H)
            if c == 0:
                torch.bmm(L, p.vr[:, j0:j1], out=ob)
            else:
                ob.baddbmm_(L, p.vr[:, j0:j1])
            visited += 1
        chunks.append(visited)
        out_v[:, :, r0 * K:r1 * K] = ob.view(B, H, M, D)
    return out, chunks


def _backward(p: _Prepared, out: Tensor, dout: Tensor, block: int, key_block: Optional[int], chunks: list):
    """Unscaled gradients in the compute dtype; see the module docstring.

    Returns (dq', dk', dv) with dq' = dl k [B,T,K,H,D] (the caller multiplies by scale), dk' = dl^T qf [B,S,H,D]
    (qf holds scale/ln2, so the caller multiplies by ln2) and dv = A^T do [B,S,H,D].
    """
    B, T, K, H, D, S = p.shape
    BH = B * H
    dev, cdt = p.qf.device, p.dtype
    do = torch.empty(B, H, T, K, D, dtype=cdt, device=dev)
    do.copy_(dout.permute(0, 3, 1, 2, 4))
    do = do.view(BH, T * K, D)
    # G_i = sum_j g_ij = do_i . out_i
    G = (dout.to(cdt) * out).sum(-1).permute(0, 3, 1, 2).reshape(BH, T * K)
    dq = torch.zeros(BH, T * K, D, dtype=cdt, device=dev)
    dkr = torch.zeros(BH, S, D, dtype=cdt, device=dev)
    dvr = torch.zeros(BH, S, D, dtype=cdt, device=dev)
    nb_max = min(block, T)
    kb = _key_block_for(nb_max * K, BH, key_block)
    width = min(max(kb, nb_max), S)  # longest chunk: the diagonal one or a key chunk, never beyond S
    rows = nb_max * K
    bufs = [torch.empty(BH * rows * width, dtype=cdt, device=dev) for _ in range(4)]
    keeps = {}
    for (r0, r1), visited in zip(_row_blocks(T, block), chunks):
        nb = r1 - r0
        M = nb * K
        if nb not in keeps:
            keeps[nb] = _diag_keep(nb, K, BH, cdt, dev)
        qb = p.qf[:, r0 * K:r1 * K]
        dob = do[:, r0 * K:r1 * K]
        dqb = dq[:, r0 * K:r1 * K]
        rest = G[:, r0 * K:r1 * K].clone()  # G_i minus the g-sum of the chunks visited so far
        carry = None
        for c, (j0, j1) in enumerate(_key_chunks(T, S, r0, r1, kb)):
            if c == visited:  # the forward stopped here: all further weights (and gradients) are 0
                break
            n = j1 - j0
            L, z, g, cs = (b[:BH * M * n].view(BH, M, n) for b in bufs)
            # cs doubles as the softplus scratch: the carry is copied out before it is overwritten
            carry = _log_weights(p, qb, j0, j1, L, cs, carry, keeps[nb] if c == 0 else None, B, H, z=z).clone()
            A = L
            torch.bmm(dob, p.vr[:, j0:j1].transpose(1, 2), out=g)  # dA
            g.mul_(A)  # g = dA * A
            torch.cumsum(g, -1, out=cs)
            nxt = rest - cs[:, :, -1]
            cs.sub_(g).neg_().add_(rest[:, :, None])  # sum_{m <= j} g (original order) = G - suffix
            rest = nxt
            cs.mul_(z)
            torch.sub(g, cs, out=g)  # dl (natural-log logits)
            dqb.baddbmm_(g, p.kr[:, j0:j1])
            dkr[:, j0:j1].baddbmm_(g.transpose(1, 2), qb)
            dvr[:, j0:j1].baddbmm_(A.transpose(1, 2), dob)
    dq = dq.view(B, H, T, K, D).permute(0, 2, 3, 1, 4)
    dk = dkr.flip(1).view(B, H, S, D).permute(0, 2, 1, 3)
    dv = dvr.flip(1).view(B, H, S, D).permute(0, 2, 1, 3)
    return dq, dk, dv


def head_major_stick_breaking(qh: Tensor, kh: Tensor, vh: Tensor, keep: Optional[Tensor], queries: int,
                              scale: float) -> Tensor:
    """Stick-breaking attention of a few query rows (decode) in the KV cache's head-major layout, un-blocked.

    The rows are ``queries`` positions x K query sets, ordered (t, k): row r is position ``S - queries + r // K``
    (the last ``queries`` of the S positions, diagonal included). One ``[B, H, R, S]`` logit tensor on K/V as they
    are (no reversed copies); the inclusive reverse cumsum runs on it by flip, cumsum, flip; autograd-able.

    Args:
        qh: ``[B, H, R, D]`` query rows (R = queries * K), any strides, unscaled.
        kh, vh: ``[B, H, S, D]`` keys / values (e.g. a KV cache's tensors; strided views are read as they are).
        keep: ``[B, S]`` 0/1 (nonzero = visible) or None.
        queries: the number of query positions T (R / K).
        scale: logit scale (1/sqrt(D) in the model).
    Returns:
        ``[B, H, R, D]`` in the compute dtype (fp32; fp64 for fp64 inputs).
    """
    S = kh.shape[2]
    cdt = _compute_dtype(qh.dtype)
    if not qh.dtype == kh.dtype == vh.dtype == cdt:  # (fp32 inputs: no conversion calls)
        qh, kh, vh = qh.to(cdt), kh.to(cdt), vh.to(cdt)
    rows = qh.shape[2]
    L = torch.matmul(qh * (scale * _INV_LN2), kh.transpose(2, 3)).clamp(-_L_CLAMP, _L_CLAMP)  # [B, H, R, S] base 2
    vis = None  # one query position without a mask (plain decode): every key is visible, so no masking passes
    if queries > 1:
        row_pos = torch.arange(S - queries, S, device=qh.device).repeat_interleave(rows // queries)
        vis = (torch.arange(S, device=qh.device)[None, :] <= row_pos[:, None]).to(cdt)  # [R, S] causal
    if keep is not None:
        keep_c = (keep != 0).to(cdt)[:, None, None, :]  # [B, 1, 1, S]
        vis = keep_c if vis is None else vis * keep_c  # [B, 1, R, S]
    sp = torch.exp2(L).log1p()  # softplus(l)
    if vis is not None:
        sp = sp * vis  # 0 where invisible: those keys do not break the stick
    cs = sp.flip(-1).cumsum(-1).flip(-1)  # sum_{m >= j} (inclusive, towards the diagonal)
    A = torch.exp2(torch.sub(L, cs, alpha=_INV_LN2).clamp(min=_LOGA_MIN))  # log2 A = L - cs / ln 2
    if vis is not None:
        A = A * vis
    return torch.matmul(A, vh)  # [B, H, R, D]


def _direct(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """Few query rows (decode) in the kernel's layout: q ``[B, T, K, H, D]``, k/v ``[B, S, H, D]`` ->
    ``[B, T, K, H, D]`` in the compute dtype, through :func:`head_major_stick_breaking`."""
    B, T, K, H, D = q.shape
    qh = q.permute(0, 3, 1, 2, 4).reshape(B, H, T * K, D)
    out = head_major_stick_breaking(qh, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), keep, T, scale)
    return out.view(B, H, T, K, D).permute(0, 2, 3, 1, 4).contiguous()


# The blocked path as torch.library custom ops (forward, backward), so torch.compile / torch.export see opaque nodes
# with shape functions instead of a Python autograd Function and data-dependent loops. ``keep`` is [B, S] bool or
# None; the forward also returns the number of key chunks each row block visited (int64 [row blocks]): the
# backward walks exactly those.

def _num_row_blocks(T: int, block: int) -> int:
    return -(-T // block)


@torch.library.custom_op("moduleformer::stick_breaking_fwd", mutates_args=())
def _sb_fwd_op(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float, block: int,
               key_block: Optional[int], skip: bool) -> tuple[Tensor, Tensor]:
    p = _Prepared(q, k, v, keep, scale)
    out, chunks = _forward(p, block, key_block, skip)
    return out, torch.tensor(chunks, dtype=torch.int64)


@_sb_fwd_op.register_fake
def _(q, k, v, keep, scale, block, key_block, skip):
    B, T, K, H, D = q.shape
    return (q.new_empty(B, T, K, H, D, dtype=_compute_dtype(q.dtype)),
            torch.empty(_num_row_blocks(T, block), dtype=torch.int64))


@torch.library.custom_op("moduleformer::stick_breaking_bwd", mutates_args=())
def _sb_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], out: Tensor, chunks: Tensor,
               scale: float, block: int, key_block: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    p = _Prepared(q, k, v, keep, scale)
    dq, dk, dv = _backward(p, out, dout, block, key_block, chunks.tolist())
    # dq = scale * dl k; qf = q * scale / ln2, so dk = scale * dl^T q = ln2 * (dl^T qf)
    # contiguous, as the shape function promises (the compiled graph's views rely on the strides)
    return ((dq * scale).to(q.dtype).contiguous(), (dk * _LN2).to(k.dtype).contiguous(),
            dv.to(v.dtype).contiguous())


@_sb_bwd_op.register_fake
def _(dout, q, k, v, keep, out, chunks, scale, block, key_block):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _sb_setup_context(ctx, inputs, output):
    q, k, v, keep, scale, block, key_block, _ = inputs
    out, chunks = output
    ctx.save_for_backward(q, k, v, keep, out, chunks)
    ctx.cfg = (scale, block, key_block)


def _sb_backward(ctx, dout, _dchunks):
    q, k, v, keep, out, chunks = ctx.saved_tensors
    dq, dk, dv = torch.ops.moduleformer.stick_breaking_bwd(dout.contiguous(), q, k, v, keep, out, chunks, *ctx.cfg)
    return dq, dk, dv, None, None, None, None, None


_sb_fwd_op.register_autograd(_sb_backward, setup_context=_sb_setup_context)


def torch_stick_breaking_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None,
                                   scale: Optional[float] = None, block_size: int = 64,
                                   key_block_size: Optional[int] = None,
                                   skip_underflow: Optional[bool] = None) -> Tensor:
    """The torch path of :func:`kernels.stick_breaking.stick_breaking_attention` (same arguments and result:
    q ``[B, T, K, H, D]``, k, v ``[B, S, H, D]``, mask ``[B, S]`` -> ``[B, T, K, H, D]`` in q's dtype)."""
    B, T, K, H, D, S = check_attention_shapes(q, k, v)
    check_attention_mask(attention_mask, B, S)
    if block_size < 1 or (key_block_size is not None and key_block_size < 1):
        raise ValueError("block sizes must be positive")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if T == 0 or B * H * K == 0:
        return q.new_zeros(B, T, K, H, D)
    if T <= DIRECT_MAX_T:  # decode: the blocked path's K/V re-layout would cost more than the attention
        keep = None if attention_mask is None else attention_mask != 0  # multiplied in: no all() host read
        return _direct(q, k, v, keep, float(scale)).to(q.dtype)
    keep = None
    if attention_mask is not None:
        keep = attention_mask != 0
        if not tracing() and bool(keep.all()):  # nothing masked: skip the extra passes
            keep = None
    if skip_underflow is None:
        skip_underflow = q.device.type == "cpu"
    out, _ = torch.ops.moduleformer.stick_breaking_fwd(q, k, v, keep, float(scale), int(block_size), key_block_size,
                                                       bool(skip_underflow))
    return out.to(q.dtype)  # computed (and saved for backward) in fp32 / fp64
