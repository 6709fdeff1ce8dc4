"""La-MAML's first-order glance for an MLP, with the backward pass written out by hand.

This is the same update as `LaMAML._glance_autograd` in first order (tests/test_lamaml.py
checks that they agree), specialised to what the paper's MNIST runs do: an MLP backbone, one
incoming sample per inner step, no inner-gradient clamp. The general fast path
(`_glance_first_order`) spends most of its time in autograd and vmap bookkeeping and in
elementwise passes over all fast weights; here every step is a handful of BLAS calls on
preallocated buffers. The derivation (docs/methods/lamaml.md, "Speed"):

Notation: K inner steps on the incoming samples x_1..x_K, fast weights w_k = w - lr * S_k with
S_k = g_1 + ... + g_k, lr = relu(alpha) (or alpha), meta-batch X (M rows), meta-loss
L = mean_k mean_m loss(f(X_m; w_k)), G_k = dL/dw_k. First order:

    dL/dw = sum_k G_k                    dL/dalpha = -lr'(alpha) * sum_k G_k * S_k

The first layer holds almost all weights (784 x 100 of 89,610). With one sample per step its
inner gradient is the outer product e_j x_j^T (e_j: the sample's back-propagated error at the
first layer), so its fast weights never need to exist:

    pre-activation of row m at w_k:  X_m W1^T + b1 - sum_{j<=k} e_j * T[j, m]
    with T[j, m] = (lr_W1 (x_j * X_m)) + lr_b1          (one (K*M, D) x (D, H) product)

and its two meta-gradients are matrix products too, with D_j = sum_{k>=j} delta_k (the
first-layer errors of the meta-batch, summed over the fast weights from step j on):

    dL/dW1 = D_1^T X        sum_k G1_k * S1_k = sum_{j,m} (e_j * D_j[m]) (x_j * X_m)^T

The remaining layers (about 11k weights) are updated explicitly, as in the general path.
The incoming samples are rows of the meta-batch (La-MAML's meta-batch is memory + incoming),
so T also gives the inner loop's own first-layer pre-activations.

Populations (issue #16): `MLPGlance(..., members=N)` runs the glances of N independent runs
(seeds, float hyperparameters) at once. Every buffer has a leading member dimension, every
product is batched over it (mm -> bmm, addmm -> baddbmm; the meta-loss's per-step products over
N*K), and the inputs are stacked per member. What batching saves is the per-operation
overhead, mostly the inner loop's ~15 small operations per step; the products themselves cost
N times a single run's. The zero-pixel skip is per member: each keeps its own nonzero
columns, padded with its own zero columns to the count of the member with the most (the
union of the members' columns grows with N, to no skip at all for 32 rotated members). A
single run is the population of one, whose inner loop drops the member dimension: the same
operations on the same memory layout, so its results are bit for bit those of a dedicated
single-run glance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

threshold_backward = torch.ops.aten.threshold_backward


def cross_entropy_and_grad(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of (..., K, M, C) logits against (..., M) labels (the same M labels for
    all K logit sets), and its gradient: one mean per leading index (shape `y.shape[:-1]`)."""
    logp = torch.log_softmax(logits, -1)
    lead = y.shape[:-1]
    if lead:  # (..., 1, M): the same labels for the K logit sets
        y = y.unsqueeze(-2)
    picked = logp.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1))
    n = logits.shape[-3] * logits.shape[-2]
    grad = logp.exp_().sub_(F.one_hot(y, logits.shape[-1]).to(logits.dtype)).div_(n)
    return (picked.sum((-3, -2, -1)) if lead else picked.sum()).div_(-n), grad


class MLPGlance:
    """Buffers and arithmetic of La-MAML glances on an MLP (flat parameter order), for
    `members` independent runs at once (a population: same architecture and K, each member its
    own weights, step sizes and batches).

    w, a: (N, P) working copies of the weights and alpha, one row per member in
    `list(mlp.parameters())` order (W1 stored transposed: `views(row)` gives parameter-shaped
    views of a row); gw, ga: (N, P) the meta-gradients the glance writes. w_views, a_views:
    member 0's parameter views (a single run: the only member). Everything, down to the row
    views the inner loop indexes, is made once per K, so an inner step is ~15 tensor operations
    for all members together.

    Inside a glance every tensor has the member dimension first, (N, ...), except for a single
    member, where it is dropped: then the glance runs mm/addmm on 2-D tensors, the very
    operations of a single-run glance, instead of bmm/baddbmm on a batch of one (those cost a
    few microseconds more each, ~5% of a glance). Dimensions are therefore counted from the end.
    """

    def __init__(self, mlp, k: int, like: Tensor, members: int = 1):
        if not mlp.plain:
            raise ValueError("MLPGlance computes a plain ReLU MLP (no dropout)")
        if members < 1:
            raise ValueError(f"members={members}: need at least one")
        opts = {"device": like.device, "dtype": like.dtype}
        shapes = [tuple(p.shape) for p in mlp.parameters()]
        numels = [p.numel() for p in mlp.parameters()]
        n = self.members = members
        self.k, self.hidden, self.n_out = k, shapes[0][0], shapes[-1][0]
        self.p1 = numels[0] + numels[1]  # first layer: W1, b1
        self.size = sum(numels)
        rest_shapes, rest_numels = shapes[2:], numels[2:]
        self.n_rest = len(rest_shapes) // 2  # layers 2..L

        def split(flat, shapes=shapes, numels=numels):  # parameter-shaped views of (..., P)
            lead = flat.shape[:-1]
            return [seg.view(*lead, *s) for seg, s in zip(flat.split(numels, -1), shapes)]

        def split_w1t(flat):  # the same, but W1 stored transposed: (D, H) rows are contiguous
            views = split(flat)
            views[0] = flat[..., :numels[0]].view(*flat.shape[:-1], *shapes[0][::-1]).mT
            return views

        def rest(flat):  # layers 2..L of (..., P2): weights (..., out, in), biases (..., 1, out)
            views = split(flat, rest_shapes, rest_numels)
            return views[0::2], [b.unsqueeze(-2) for b in views[1::2]]

        # "member space": (N, ...) as it is, or (1, ...) without its member dimension
        one = n == 1
        ms = self._ms = (lambda v: v[0]) if one else (lambda v: v)
        self._lead = () if one else (n,)
        self._mm, self._addmm = (torch.mm, torch.addmm) if one else (torch.bmm, torch.baddbmm)
        self._sums_mm = torch.mm if one else torch.matmul  # (K, K) @ (..., K, X)
        # (N*K, ...) stacks as (..., K, ...), and the dimension of their K steps
        self._by_step = (lambda g: g) if one else (lambda g: g.view(n, k, *g.shape[1:]))
        self._kdim = 0 if one else 1

        self.views = split_w1t
        self.w, self.a, self.lr = (torch.zeros(n, self.size, **opts) for _ in range(3))
        self.gw, self.ga = torch.zeros(n, self.size, **opts), torch.zeros(n, self.size, **opts)
        self.w_views, self.a_views = split_w1t(self.w[0]), split_w1t(self.a[0])
        # W1 and its companions as (D, H), contiguous per member: products read whole rows,
        # and the rows of all-zero input pixels are skipped by gathering/scattering rows (see
        # `_first_layer`).
        (self.W1t, self.b1), (self.lrW1t, self.lrb1) = (
            (ms(v[0].mT), ms(v[1].unsqueeze(1))) for v in (split_w1t(self.w), split_w1t(self.lr)))
        (self.gwW1t, self.gwb1), (self.gaW1t, self.gab1) = (
            (ms(v[0].mT), ms(v[1])) for v in (split_w1t(self.gw), split_w1t(self.ga)))
        self.lr_rest = ms(self.lr[:, self.p1:])
        self.gw_rest = [ms(v) for v in split(self.gw[:, self.p1:], rest_shapes, rest_numels)]
        self.ga_rest = [ms(v) for v in split(self.ga[:, self.p1:], rest_shapes, rest_numels)]

        # Layers 2..L: explicit fast weights and inner gradients Gr; the running sums
        # S_k = g_1 + ... + g_k are one product after the inner loop. Wr holds a copy of w's
        # rows (N, P2) then the fast weights after each step (N, K, P2): for one member its
        # rows sit where a single run's always did (GEMM results depend on the alignment of
        # their operands, and this keeps a single run's results bit for bit).
        p2 = self.size - self.p1
        self.Wr = torch.zeros(n * (k + 1), p2, **opts)
        self.W0, fast = self.Wr[:n], self.Wr[n:].view(n, k, p2)
        self.Gr, self.Sr = torch.zeros(n, k, p2, **opts), torch.zeros(n, k, p2, **opts)
        self.Gr_ms, self.Sr_ms = ms(self.Gr), ms(self.Sr)
        w_in = [self.W0] + [fast[:, i] for i in range(k - 1)]  # step i reads
        self.W_in = [ms(row) for row in w_in]
        self.W_out = [ms(fast[:, i]) for i in range(k)]  # step i writes
        self.G_flat = [ms(self.Gr[:, i]) for i in range(k)]
        self.W_rows, self.Wt_rows, self.b_rows = [], [], []
        for row in w_in:
            weights, biases = rest(row)
            self.W_rows.append([ms(v) for v in weights])  # (N, out, in)
            self.Wt_rows.append([ms(v.mT) for v in weights])  # (N, in, out)
            self.b_rows.append([ms(b) for b in biases])  # (N, 1, out)
        self.gW_rows, self.delta_rows, self.deltaT_rows = [], [], []
        for i in range(k):
            weights, biases = rest(self.Gr[:, i])
            self.gW_rows.append([ms(v) for v in weights])  # (N, out, in) weight gradients
            self.delta_rows.append([ms(b) for b in biases])  # (N, 1, out) bias gradients
            self.deltaT_rows.append([ms(b.mT) for b in biases])
        # The meta-loss's (N*K, ...) stacks: member-major, step-minor.
        self.W_stack = split(fast.view(n * k, p2), rest_shapes, rest_numels)
        self.S_stack = split(self.Sr.view(n * k, p2), rest_shapes, rest_numels)
        self.Wt_stack = [v.mT if v.dim() == 3 else v.unsqueeze(1) for v in self.W_stack]

        # First layer: inner errors e_j and the incoming rows' pre-activations.
        self.E = torch.zeros(n, k, self.hidden, **opts)
        self.E_ms = ms(self.E)
        self.E_rows = [ms(self.E[:, i:i + 1]) for i in range(k)]
        self.Zin = torch.zeros(n, k, self.hidden, **opts)
        self.Zin_ms = ms(self.Zin)
        self.Z_rows = [ms(self.Zin[:, i:i + 1]) for i in range(k)]
        self.onehot = torch.zeros(n, k, self.n_out, **opts)
        self.onehot_rows = [ms(self.onehot[:, i:i + 1]) for i in range(k)]
        # prefix @ v: sums over steps j <= k (cumsum is several times slower on CPU);
        # suffix @ v: sums over steps k >= j.
        self.prefix = torch.ones(k, k, **opts).tril_()
        self.suffix = self.prefix.t().contiguous()

    # ------------------------------------------------------------------------------
    def glance(self, x: Tensor, y: Tensor, bx: Tensor, by: Tensor, mask_inner: Tensor | None,
               mask_meta: Tensor | None, need_w: bool, need_alpha: bool, relu_lr: bool,
               incoming_in_meta: bool) -> Tensor:
        """One glance of every member: inner loop on (x, y), meta-loss on (bx, by) at every
        fast weight set. Inputs are stacked per member: x (N, K, ...), y (N, K),
        bx (N, M, ...), by (N, M).

        incoming_in_meta: bx ends with the K incoming samples x (La-MAML's meta-batch is
        memory + incoming), whose first-layer corrections then serve the inner loop too.
        mask_inner (N, C) / mask_meta (N, M, C): additive logit masks (0 or MASK_VALUE) or None.
        Writes gw and/or ga; returns the meta-loss of each member, (N,).
        """
        if relu_lr:
            torch.clamp_min(self.a, 0.0, out=self.lr)
        else:
            self.lr.copy_(self.a)
        ms = self._ms
        if mask_inner is not None:
            mask_inner = ms(mask_inner.unsqueeze(1))
        X, XW, B, T, T_in, cols = self._first_layer(ms(x), ms(bx), incoming_in_meta)
        self._inner_loop(ms(y), T_in, mask_inner)
        loss = self._meta_gradients(X, XW, B, T, cols, ms(by),
                                    None if mask_meta is None else ms(mask_meta),
                                    need_w, need_alpha, relu_lr)
        return loss.view(self.members)

    def _first_layer(self, x: Tensor, bx: Tensor, incoming_in_meta: bool):
        """Meta-batch rows X, their pre-activations XW at w, the products B and corrections T
        (below), T on the incoming rows, and the input columns kept (None: all; members:
        (member, column) index pairs); all in member space. Writes the incoming rows' pre-activations into Zin."""
        lead, k = self._lead, self.k
        m = bx.shape[len(lead)]
        xin = x.reshape(*lead, k, -1)
        if incoming_in_meta:  # La-MAML's meta-batch ends with the incoming samples
            X, first = bx.reshape(*lead, m, -1), m - k
        else:  # rows m.. serve the inner loop only
            X, first = torch.cat([bx.reshape(*lead, m, -1), xin], -2), m
        XW = self._addmm(self.b1, X, self.W1t)  # (rows, H) at w

        # Pixels that are zero in all K incoming samples of a member (MNIST's background: ~45%
        # of them) add nothing to its T or to the alpha gradient of its W1 below, whose rows
        # there are exactly zero: skip them. CPU only (finding them would be a host sync on a
        # GPU). One member keeps its nonzero columns; members keep as many columns each as the
        # member with the most, their own nonzero ones padded with their own zero ones (which
        # add exact zeros), so none computes the union of the members' columns.
        cols, Xc, lrW1t = None, X, self.lrW1t
        if X.device.type == "cpu":
            if not lead:
                cols = xin.ne(0).any(0).nonzero().squeeze(1)
                kept = cols.numel()
            else:
                nonzero = xin.ne(0).any(-2)  # (N, D)
                kept = int(nonzero.sum(-1).max())
            if kept > 0.8 * X.shape[-1]:
                cols = None
            elif not lead:
                Xc, xin, lrW1t = X.index_select(-1, cols), xin.index_select(-1, cols), \
                    lrW1t.index_select(-2, cols)
            else:  # (N, kept): each member's nonzero columns in order, then zero ones
                cols = nonzero.logical_not().to(torch.uint8).argsort(dim=-1, stable=True)
                # rows picked by (member, column) pairs: several times faster than gather
                member = torch.arange(cols.shape[0], device=cols.device).unsqueeze(1)
                cols = (member, cols[:, :kept])
                Xc, xin, lrW1t = X.mT[cols].mT, xin.mT[cols].mT, lrW1t[cols]

        # T[j, r] = lr_W1 (x_j * X_r) + lr_b1: the first-layer correction of every fast weight.
        B = Xc.unsqueeze(-3) * xin.unsqueeze(-2)  # (K, rows, D)
        T = self._addmm(self.lrb1, B.view(*lead, -1, B.shape[-1]), lrW1t)
        T = T.view(*lead, k, X.shape[-2], -1)
        T_in = T[..., first:first + k, :].unbind(-3)  # K x (K, H): on the incoming rows
        self.Zin_ms.copy_(XW[..., first:first + k, :])
        if not incoming_in_meta:
            X, B, T, XW = X[..., :m, :], B[..., :m, :], T[..., :m, :], XW[..., :m, :]
        return X, XW, B, T, T_in, cols

    def _inner_loop(self, y: Tensor, T_in: tuple[Tensor, ...], mask_inner: Tensor | None):
        """K single-sample SGD steps from w (first order: no graph), all members at once:
        writes the fast weights Wr, inner gradients Gr and first-layer errors E."""
        k, n_rest, mm, addmm = self.k, self.n_rest, self._mm, self._addmm
        self.W0.copy_(self.w[:, self.p1:])
        self.onehot.zero_().scatter_(2, y.view(self.members, k, 1), 1.0)
        for i in range(k):
            hs = [torch.relu(self.Z_rows[i])]
            Wt, W, b = self.Wt_rows[i], self.W_rows[i], self.b_rows[i]
            for layer in range(n_rest - 1):
                hs.append(addmm(b[layer], hs[-1], Wt[layer]).relu_())
            logits = addmm(b[-1], hs[-1], Wt[-1])
            if mask_inner is not None:
                logits.add_(mask_inner)
            delta, deltaT = self.delta_rows[i], self.deltaT_rows[i]
            torch.sub(torch.softmax(logits, -1), self.onehot_rows[i], out=delta[-1])
            for layer in range(n_rest - 1, -1, -1):
                # outer product delta^T h (one sample: a product, no sums)
                torch.mul(deltaT[layer], hs[layer], out=self.gW_rows[i][layer])
                below = delta[layer - 1] if layer else self.E_rows[i]
                # relu': sign(h) of the relu output (threshold_backward's out= is slow)
                torch.mul(mm(delta[layer], W[layer]), torch.sign(hs[layer]), out=below)
            torch.addcmul(self.W_in[i], self.lr_rest, self.G_flat[i], value=-1.0,
                          out=self.W_out[i])
            if i + 1 < k:  # the later incoming rows see this step's first-layer change
                self.Zin_ms.addcmul_(T_in[i], self.E_rows[i], value=-1.0)

    def _meta_gradients(self, X, XW, B, T, cols, by, mask_meta, need_w, need_alpha, relu_lr):
        """The meta-loss at the K fast weight sets of every member, forward and backward at
        once; writes gw and/or ga (derivation in the module docstring)."""
        lead, k, m, n_rest, E = self._lead, self.k, X.shape[-2], self.n_rest, self.E_ms
        nk, sums_mm, by_step, kdim = self.members * k, self._sums_mm, self._by_step, self._kdim
        # C[k] = sum_{j<=k} e_j * T[j]: (K, M, H)
        C = sums_mm(self.prefix, (E.unsqueeze(-2) * T).view(*lead, k, -1)).view(*lead, k, m, -1)
        hs = [torch.sub(XW.unsqueeze(-3), C).relu_().view(nk, m, -1)]  # (N*K, M, H)
        ws, wts = self.W_stack, self.Wt_stack
        for layer in range(n_rest - 1):
            hs.append(torch.baddbmm(wts[2 * layer + 1], hs[-1], wts[2 * layer]).relu_())
        logits = torch.baddbmm(wts[-1], hs[-1], wts[-2]).view(*lead, k, m, -1)
        if mask_meta is not None:
            logits.add_(mask_meta.unsqueeze(-3))
        loss, delta = cross_entropy_and_grad(logits, by)
        delta = delta.view(nk, m, -1)
        if need_alpha:
            sums_mm(self.prefix, self.Gr_ms, out=self.Sr_ms)  # S_k = g_1 + ... + g_k
        for layer in range(n_rest - 1, -1, -1):
            gW = torch.bmm(delta.transpose(1, 2), hs[layer])  # (N*K, out, in): G_k
            gb = delta.sum(1)
            for g, idx in ((gW, 2 * layer), (gb, 2 * layer + 1)):
                if need_w:
                    torch.sum(by_step(g), kdim, out=self.gw_rest[idx])
                if need_alpha:
                    torch.sum(by_step(g.mul_(self.S_stack[idx])), kdim, out=self.ga_rest[idx])
            delta = threshold_backward(torch.bmm(delta, ws[2 * layer]), hs[layer], 0)
        # first layer: delta (K, M, H); D_j = sum_{k>=j} delta_k
        D = sums_mm(self.suffix, delta.view(*lead, k, -1)).view(*lead, k, m, -1)
        if need_w:
            d0 = D[..., 0, :, :]
            self._mm(X.mT, d0, out=self.gwW1t)
            torch.sum(d0, -2, out=self.gwb1)
        if need_alpha:
            A = D.mul_(E.unsqueeze(-2)).view(*lead, k * m, -1)  # rows (j, m): e_j * D_j[m]
            Bt = B.reshape(*lead, k * m, -1).mT
            if cols is None:
                self._mm(Bt, A, out=self.gaW1t)
            elif isinstance(cols, tuple):  # each member's own columns
                self.gaW1t.zero_().index_put_(cols, self._mm(Bt, A))
            else:
                self.gaW1t.zero_().index_copy_(-2, cols, self._mm(Bt, A))
            torch.sum(A, -2, out=self.gab1)
            self.ga.neg_()
            if relu_lr:
                self.ga.mul_(torch.sign(self.lr))  # relu'(alpha); a > 0 is much slower
        return loss
