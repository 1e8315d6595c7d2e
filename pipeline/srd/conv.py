"""SRD rules for CNN branches: conv (+BN folded), frozen max/avg pooling, identity shortcut.

Efficient form (docs/method.md §3): the bias-free part of a branch is input x VJP of the
modified upstream signal g (one transposed conv, one pooling fold); only the bias share needs
per-pair norms ||c0(p->q)||, computed per kernel tap (k^2 one-by-one products, each the size of
one output map) instead of the reference's 2 k^2 full convolutions per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.srd.errors import UnsupportedModuleError


def _pair(x: int | tuple[int, ...]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def sqrt0(x: Tensor) -> Tensor:
    """sqrt of x >= 0 with gradient 0 instead of inf where x == 0. Pair norms are exactly zero at
    padding taps and dead channels, where a plain sqrt would turn a differentiable map's
    gradient into NaN; without an autograd graph this is the plain sqrt."""
    if not x.requires_grad:
        return x.sqrt()
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), 0.0)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
            shift_eps: bool = True) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of conv followed by eval-mode BN, as one affine map (BN is never a step).

    [choice] (docs/method.md §2) the BN shift includes eps, beta - gamma*mean/sqrt(var + eps):
    the true affine map of the forward pass. `shift_eps=False` is the reference code's shift,
    beta - gamma*mean/sqrt(var) (its scale keeps eps), for `reference=True` (docs/method.md §3.7).
    """
    w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    if bn is None:
        return w, b
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift_scale = scale if shift_eps else bn.weight.detach() / torch.sqrt(bn.running_var)
    shift = bn.bias.detach() - shift_scale * bn.running_mean
    if b is not None:
        shift = shift + scale * b
    return w * scale.reshape(-1, 1, 1, 1), shift


class Geometry:
    """Windows of a k x k, stride s, padding p, dilation d sliding op from an [H, W] source to an
    [Ho, Wo] output. Padding is explicit (and a ceil-mode overhang is added on the right), so
    unfold/fold see exactly Ho*Wo windows; padded taps read zeros and receive nothing."""

    def __init__(self, kernel, stride, padding, dilation, in_size, out_size) -> None:
        self.k, self.s = _pair(kernel), _pair(stride)
        self.p, self.d = _pair(padding), _pair(dilation)
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        self.ext = tuple((o - 1) * s + d * (k - 1) + 1
                         for o, s, d, k in zip(self.out_size, self.s, self.d, self.k))
        # (left, right, top, bottom) pads; a negative right pad crops rows no window reads
        self.pads = (self.p[1], self.ext[1] - self.p[1] - self.in_size[1],
                     self.p[0], self.ext[0] - self.p[0] - self.in_size[0])

    @property
    def taps(self) -> int:
        return self.k[0] * self.k[1]

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads)

    def unfold(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, k*k, Ho*Wo] window taps (zeros in padding)."""
        cols = F.unfold(self.pad(x), self.k, self.d, 0, self.s)
        return cols.view(x.shape[0], x.shape[1], self.taps, -1)

    def fold(self, cols: Tensor) -> Tensor:
        """[B, C, k*k, Ho*Wo] -> [B, C, H, W]: adds every tap back to its source position."""
        out = F.fold(cols.flatten(1, 2), self.ext, self.k, self.d, 0, self.s)
        return F.pad(out, [-q for q in self.pads])

    def tap_slice(self, xp: Tensor, i: int, j: int) -> Tensor:
        """The source PFVs read by tap (i, j) of every window, from a padded map: [.., Ho, Wo]."""
        (sh, sw), (dh, dw), (ho, wo) = self.s, self.d, self.out_size
        return xp[..., i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]


TIES = ("split", "reference")


class FrozenPool:
    """A max or average pooling with its pattern frozen (docs/method.md §3.5): per channel,
    pooled(q') = sum_u m_u(q') * x[s q' + u - p], with m_u = 1/count for average pooling and,
    for max pooling, a channel-wise selection of the window's maximum.

    ties (max pooling): "split" (default, [choice]) gives each of the t taps holding a window's
    maximum m_u = 1/t: the pooled value stays exact, relevance is conserved and no tap is
    favoured by scan order. "reference" reproduces the authors' code: m_u = 1 on every tap whose
    value equals the pooled one and that is the recorded winner of some window (their un-pooled
    map), so a tied channel counts once per such tap and the shares sum to more than one.
    """

    def __init__(self, module: nn.MaxPool2d | nn.AvgPool2d, x: Tensor, path: str,
                 ties: str = "split") -> None:
        if getattr(module, "dilation", 1) not in (1, (1, 1)):
            raise UnsupportedModuleError(module, path, "dilated pooling")
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        out = module(x)
        self.geo = Geometry(module.kernel_size, module.stride or module.kernel_size,
                            module.padding, 1, x.shape[2:], out.shape[2:])
        h, w = x.shape[2:]
        flat = torch.arange(1, h * w + 1, dtype=torch.float64, device=x.device).view(1, 1, h, w)
        src = self.geo.unfold(flat)[0, 0].long() - 1  # [k*k, L] flat source index, -1 = padding
        pooled = out.flatten(2).unsqueeze(2)  # [N, C, 1, L]
        if isinstance(module, nn.MaxPool2d) and ties == "reference":
            _, ind = F.max_pool2d(x, self.geo.k, self.geo.s, self.geo.p, 1, module.ceil_mode, True)
            winners = torch.zeros_like(x).flatten(2).scatter_(2, ind.flatten(2), 1.0).view_as(x)
            self.m = ((self.geo.unfold(x * winners) == pooled) & (pooled != 0)).to(x.dtype)
            reproduced = ((self.m.sum(2) > 0) | (out.flatten(2) == 0)).all()
        else:
            if isinstance(module, nn.MaxPool2d):
                won = ((self.geo.unfold(x) == pooled) & (src >= 0)).to(x.dtype)
                self.m = won / won.sum(2, keepdim=True)
            else:
                self.m = self._avg_weights(module, src, h, w).to(x.dtype)[None, None]
            reproduced = torch.allclose(self.taps(x).sum(2).view_as(out), out, rtol=1e-5, atol=1e-6)
        if not reproduced:
            raise UnsupportedModuleError(module, path, "pooling configuration not reproduced")

    def _avg_weights(self, module: nn.AvgPool2d, src: Tensor, h: int, w: int) -> Tensor:
        valid = (src >= 0).to(torch.float64)
        if module.divisor_override:
            return valid / module.divisor_override
        if not module.count_include_pad:
            return valid / valid.sum(0, keepdim=True)
        # torch counts padded taps but not a ceil-mode overhang beyond the padding
        ones = torch.ones(1, 1, h, w, dtype=torch.float64, device=src.device)
        ones = F.pad(ones, [self.geo.p[1]] * 2 + [self.geo.p[0]] * 2, value=1.0)
        padded = Geometry(self.geo.k, self.geo.s, 0, 1, ones.shape[2:], self.geo.out_size).unfold(ones)[0, 0]
        return valid / padded.sum(0, keepdim=True)

    def taps(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C, k*k, L']: the part of each window tap that reaches the output."""
        return self.geo.unfold(x) * self.m

    def vjp(self, g: Tensor) -> Tensor:
        """Transpose of the frozen pooling: g [N*S, C, H', W'] -> [N*S, C, H, W]."""
        b, c = g.shape[:2]
        if self.m.shape[0] == 1:  # one pattern for the whole batch (average pooling, or N = 1)
            cols = self.m * g.reshape(b, c, 1, -1)
        else:  # per-image argmax, shared by that image's S seeds
            cols = self.m.unsqueeze(1) * g.reshape(self.m.shape[0], -1, c, 1, g.shape[2] * g.shape[3])
        return self.geo.fold(cols.reshape(b, c, self.geo.taps, -1))


class IdentityRule:
    """Identity shortcut (or skip): source p = q contributes x_q itself, no bias share.
    `stream`: the skip of a transformer's residual stream, along which a token read by the head
    (the CLS token) keeps the head's direction (`graph.propagate`, docs/method.md §3.3)."""

    bias = None

    def __init__(self, source: str, stream: bool = False) -> None:
        self.source = source
        self.stream = stream

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        return (g * src.unsqueeze(1)).sum(2)


class PoolRule(IdentityRule):
    """A frozen pooling feeding an add or a tap directly (ResNet-18 shortcut after the stem
    max-pool, VGG pool outputs as tap layers): linear, no bias."""

    def __init__(self, source: str, pool: FrozenPool) -> None:
        super().__init__(source)
        self.pool = pool

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        n, s = g.shape[:2]
        return (self.pool.vjp(g.flatten(0, 1)).view(n, s, *src.shape[1:]) * src.unsqueeze(1)).sum(2)


class ConvRule:
    """Conv with BN folded in, optionally preceded by a frozen pooling that then belongs to this
    block (docs/method.md §3: max pooling joins the next conv's block, sources are pre-pool
    PFVs). Per-pair contributions c0(p->q) sum over every (conv tap, pool tap) path from p to q."""

    def __init__(self, source: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, src: Tensor,
                 out_size: tuple[int, int], pool: FrozenPool | None = None, path: str = "",
                 shift_eps: bool = True) -> None:
        self.source, self.pool, self.src = source, pool, src
        if conv.padding_mode != "zeros":
            raise UnsupportedModuleError(conv, path, f"padding_mode {conv.padding_mode!r}: pads must be zeros")
        if bn is not None and bn.running_var is None:
            raise UnsupportedModuleError(bn, path, "BatchNorm without running statistics is not affine")
        self.weight, self.bias = fold_bn(conv, bn, shift_eps)
        if self.bias is not None:
            self.bias = self.bias.reshape(1, -1, 1, 1)
        self.groups = conv.groups
        conv_in = pool.geo.out_size if pool is not None else tuple(src.shape[2:])
        self.geo = Geometry(self.weight.shape[2:], conv.stride, conv.padding, conv.dilation,
                            conv_in, out_size)
        if pool is None:
            self.pair_geo = self.geo
        else:  # the composite pool -> conv as one sliding window over the pre-pool map
            if self.geo.d != (1, 1):
                raise UnsupportedModuleError(conv, path, "dilated conv after pooling")
            pg, cg = pool.geo, self.geo
            k = tuple(ps * (ck - 1) + pk for ps, ck, pk in zip(pg.s, cg.k, pg.k))
            st = tuple(ps * cs for ps, cs in zip(pg.s, cg.s))
            pd = tuple(ps * cp + pp for ps, cp, pp in zip(pg.s, cg.p, pg.p))
            self.pair_geo = Geometry(k, st, pd, 1, src.shape[2:], out_size)
        self._norms: Tensor | None = None

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        n, s = g.shape[:2]
        conv_in = (n * s, self.weight.shape[1] * self.groups, *self.geo.in_size)
        gc = torch.nn.grad.conv2d_input(conv_in, self.weight, g.flatten(0, 1), self.geo.s,
                                        self.geo.p, self.geo.d, self.groups)
        if self.pool is not None:
            gc = self.pool.vjp(gc)
        return (gc.view(n, s, *src.shape[1:]) * src.unsqueeze(1)).sum(2)

    def norms(self) -> Tensor:
        """Per-pair norms ||c0(p->q)|| as [N, K*K, Ho*Wo] over the pair geometry's window taps."""
        if self._norms is None:
            self._norms = self._pool_norms() if self.pool is not None else self._conv_norms()
        return self._norms

    def _kind(self) -> str:
        """How per-tap norms are formed: element-wise for a depthwise conv (output o reads input
        o // (cout/G) only); as a quadratic form x^T W_t^T W_t x over the cin(cin+1)/2 products
        x_c x_d when that is much smaller than the k^2 cout outputs (RGB input: the stem, a
        patch embedding); else directly as ||W_t x||."""
        cout, cin, kh, kw = self.weight.shape
        if cin == 1:
            return "depthwise"
        small = self.groups == 1 and 4 * cin * (cin + 1) // 2 <= kh * kw * cout
        return "gram" if small else "direct"

    def _tap_matrices(self, kind: str) -> Tensor:
        """Per tap t: [K, G, cin, cout/G] (direct), [K, cin(cin+1)/2] quadratic-form coefficients
        (Gram), or [K, G] summed squared weights (depthwise)."""
        cout, cin = self.weight.shape[:2]
        w = self.weight.flatten(2).permute(2, 0, 1).reshape(-1, self.groups, cout // self.groups, cin)
        if kind == "depthwise":
            return w.square().sum((2, 3))
        if kind == "gram":
            gram = w[:, 0].transpose(1, 2) @ w[:, 0]  # [K, cin, cin]
            iu = torch.triu_indices(cin, cin, device=w.device)
            return gram[:, iu[0], iu[1]] * torch.where(iu[0] == iu[1], 1.0, 2.0).to(w.dtype)
        return w.transpose(2, 3)

    def _tap_norm(self, x: Tensor, w: Tensor, kind: str) -> Tensor:
        """||W_t x|| for channels-last PFVs x [M, C_in] read by one tap: [M]."""
        return self._row_norms(x, w.unsqueeze(0), kind)[:, 0]

    def _row_norms(self, x: Tensor, w: Tensor, kind: str, budget: int = 1 << 24) -> Tensor:
        """||W_t x_m|| for rows x [M, C_in] and T taps' matrices w [T, ...] at once: [M, T],
        as one GEMM against all taps side by side, in row chunks of bounded memory."""
        if kind == "depthwise":
            return sqrt0(x.square() @ w.T)
        if kind == "gram":
            iu = torch.triu_indices(x.shape[1], x.shape[1], device=x.device)
            step = max(1, budget // iu.shape[1])
            sq = torch.cat([(r[:, iu[0]] * r[:, iu[1]]) @ w.T for r in x.split(step)])
            return sqrt0(sq.clamp(min=0))
        if self.groups > 1:  # grouped (non-depthwise) conv: group by group, squared norms add
            xg = x.view(x.shape[0], self.groups, -1)
            sq = sum(self._direct_norms(xg[:, g], w[:, g], budget).square() for g in range(self.groups))
            return sqrt0(sq)
        return self._direct_norms(x, w[:, 0], budget)

    @staticmethod
    def _direct_norms(x: Tensor, w: Tensor, budget: int) -> Tensor:
        """Rows x [M, cin] against T tap matrices w [T, cin, cout]: ||x W_t|| as [M, T]."""
        t, cin, cout = w.shape
        wcat = w.permute(1, 0, 2).reshape(cin, t * cout)
        step = max(1, budget // (t * cout))
        return torch.cat([torch.linalg.vector_norm((r @ wcat).view(-1, t, cout), dim=2) for r in x.split(step)])

    @staticmethod
    def _rows(x: Tensor) -> Tensor:
        """[N, C, h, w] map (a strided tap view) -> channels-last rows [N*h*w, C]."""
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def _conv_norms(self) -> Tensor:
        """Per tap t, ||W_t x_{s q + t - p}|| at every output q, with the cost of one conv and no
        Python loop over positions. Taps are grouped by the residue of their offset modulo the
        stride: one such class reads one strided sub-grid of the padded map, whose PFVs go
        through one GEMM against the class's taps side by side; each tap then reads its norms
        at its shift. Padded positions read zeros."""
        geo, kind = self.geo, self._kind()
        xp, mats = geo.pad(self.src), self._tap_matrices(kind)
        (kh, kw), (sh, sw), (dh, dw), (ho, wo) = geo.k, geo.s, geo.d, geo.out_size
        n = self.src.shape[0]
        norms = self.src.new_empty(n, kh * kw, ho, wo)
        for rh in range(sh):
            for rw in range(sw):
                taps = [(i, j) for i in range(kh) for j in range(kw)
                        if (i * dh) % sh == rh and (j * dw) % sw == rw]
                if not taps:
                    continue
                sub = xp[..., rh::sh, rw::sw]
                rows = self._rows(sub)
                tap_norms = self._row_norms(rows, mats[[i * kw + j for i, j in taps]], kind)
                tap_norms = tap_norms.view(n, *sub.shape[2:], len(taps))
                for c, (i, j) in enumerate(taps):
                    oh, ow = (i * dh - rh) // sh, (j * dw - rw) // sw
                    norms[:, i * kw + j] = tap_norms[:, oh:oh + ho, ow:ow + wo, c]
        return norms.flatten(2)

    def _pool_norms(self) -> Tensor:
        """Norms of the composite pool -> conv: p reaches q through every (conv tap t, pool tap u)
        with s_p t + u = d (the displacement); paths sharing d are summed before the norm."""
        pg, cg, pair = self.pool.geo, self.geo, self.pair_geo
        sel = self.pool.taps(self.src)  # [N, C, kp*kp, H'*W']
        sel = cg.pad(sel.view(*sel.shape[:3], *pg.out_size).movedim(2, 0))  # [kp*kp, N, C, ..]
        paths: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for i in range(cg.k[0]):
            for j in range(cg.k[1]):
                for u in range(pg.taps):
                    d = (pg.s[0] * i + u // pg.k[1], pg.s[1] * j + u % pg.k[1])
                    paths.setdefault(d, []).append((i, j, u))
        n, (ho, wo), kind = self.src.shape[0], cg.out_size, self._kind()
        ws, direct = self._tap_matrices(kind), self._tap_matrices("direct")
        norms = self.src.new_zeros(n, pair.taps, ho * wo)
        for (dh, dw), combos in paths.items():
            rows = [(self._rows(cg.tap_slice(sel[u], i, j)), i * cg.k[1] + j) for i, j, u in combos]
            if len(rows) == 1:
                nrm = self._tap_norm(rows[0][0], ws[rows[0][1]], kind)
            else:  # several paths reach q from the same p: sum the contributions, then the norm
                y = sum(x.view(x.shape[0], self.groups, -1).transpose(0, 1) @ direct[t] for x, t in rows)
                nrm = torch.linalg.vector_norm(y, dim=(0, 2))
            norms[:, dh * pair.k[1] + dw] = nrm.view(n, ho * wo)
        return norms

    def norm_total(self) -> Tensor:
        return self.norms().sum(1).view(-1, *self.geo.out_size)

    def scatter(self, beta: Tensor) -> Tensor:
        n, s = beta.shape[:2]
        cols = self.norms().unsqueeze(1) * beta.reshape(n, s, 1, -1)
        out = self.pair_geo.fold(cols.reshape(n * s, 1, self.pair_geo.taps, -1))
        return out.view(n, s, *self.pair_geo.in_size)


class PositionwiseRule:
    """An affine map that acts on each position alone (docs/method.md §3.5): a LayerNorm with its
    scale frozen at the recorded PFV, a 1x1 conv or a Linear over channels, or a chain of them
    (ConvNeXt's LN -> fc1, a block's layer-scaled fc2, CLIP's pre-norm). Target q has the one
    source p = q, so its contribution is the branch output itself: c0(q->q) = out_q - bias_q,
    read off the recorded pass (no weights needed), and the bias share goes wholly to it."""

    def __init__(self, source: str, out: Tensor, bias: Tensor | None) -> None:
        self.source = source
        self.bias = None if bias is None else bias.to(out.dtype).reshape(1, -1, *([1] * (out.dim() - 2)))
        self.c0 = out if self.bias is None else out - self.bias  # [N, C, *pos]
        self._norms = sqrt0(self.c0.square().sum(1))  # ||c0(q->q)|| [N, *pos]

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        return (g * self.c0.unsqueeze(1)).sum(2)

    def norm_total(self) -> Tensor:
        return self._norms

    def scatter(self, beta: Tensor) -> Tensor:
        return self._norms.unsqueeze(1) * beta


def norm_shift(norm: nn.Module, linear: nn.Module | None = None) -> Tensor | None:
    """The bias of a LayerNorm with its scale frozen (its shift beta), or of that LayerNorm followed
    by a Linear / 1x1 conv (W beta + b): the part of the positionwise map that no PFV carries.
    An identity `norm` has none; [C_out] or None."""
    beta = getattr(norm, "bias", None)
    beta = None if beta is None else beta.detach()
    if linear is None:
        return beta
    w = linear.weight.detach().flatten(1)
    b = None if linear.bias is None else linear.bias.detach()
    if beta is not None:
        b = w @ beta if b is None else w @ beta + b
    return b


class TargetScaledRule:
    """A linear mixing followed by a LayerNorm of the target with its scale frozen (Swin's patch
    merging: 2x2 space-to-depth, LN, reduction): c0(p->q) = s_q c0'(p->q) with c0' the inner
    rule's bias-free contributions and s_q = 1/sigma_q > 0 per target position; the branch bias
    (W beta) is its own, shared by these norms."""

    def __init__(self, inner: ConvRule, scale: Tensor, bias: Tensor | None) -> None:
        self.inner, self.source, self.scale, self.bias = inner, inner.source, scale, bias  # scale [N, *pos_t]

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        return self.inner.contribution_relevance(g * self.scale[:, None, None], src)

    def norm_total(self) -> Tensor:
        return self.inner.norm_total() * self.scale

    def scatter(self, beta: Tensor) -> Tensor:
        return self.inner.scatter(beta * self.scale.unsqueeze(1))
