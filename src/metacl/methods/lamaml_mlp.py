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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

threshold_backward = torch.ops.aten.threshold_backward


def cross_entropy_and_grad(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of (..., M, C) logits against (M,) labels, and its gradient."""
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, y.expand(*logits.shape[:-1]).unsqueeze(-1))
    n = picked.numel()
    grad = logp.exp_().sub_(F.one_hot(y, logits.shape[-1]).to(logits.dtype)).div_(n)
    return picked.sum().div_(-n), grad


class MLPGlance:
    """Buffers and arithmetic of one La-MAML glance on an MLP (flat parameter order).

    w, a: (P,) working copies of the weights and alpha in `list(mlp.parameters())` order;
    gw, ga: (P,) the meta-gradients the glance writes. Everything, down to the row views the
    inner loop indexes, is made once per K, so an inner step is ~15 tensor operations.
    """

    def __init__(self, mlp, k: int, like: Tensor):
        if not mlp.plain:
            raise ValueError("MLPGlance computes a plain ReLU MLP (no dropout)")
        opts = {"device": like.device, "dtype": like.dtype}
        shapes = [tuple(p.shape) for p in mlp.parameters()]
        numels = [p.numel() for p in mlp.parameters()]
        self.k, self.hidden, self.n_out = k, shapes[0][0], shapes[-1][0]
        self.p1 = numels[0] + numels[1]  # first layer: W1, b1
        self.size = sum(numels)
        rest_shapes, rest_numels = shapes[2:], numels[2:]
        self.n_rest = len(rest_shapes) // 2  # layers 2..L

        def split(flat, shapes=shapes, numels=numels):  # parameter-shaped views of (P,)
            return [seg.view(s) for seg, s in zip(flat.split(numels), shapes)]

        def split_w1t(flat):  # the same, but W1 stored transposed: (D, H) rows are contiguous
            views = split(flat)
            views[0] = flat[:numels[0]].view(shapes[0][::-1]).t()
            return views

        def stacked(rows):  # per-parameter (n, *shape) views of (n, P2) rows
            return [seg.view(rows.shape[0], *s) for seg, s in
                    zip(rows.split(rest_numels, dim=1), rest_shapes)]

        self.views = split_w1t
        self.w, self.a, self.lr = (torch.zeros(self.size, **opts) for _ in range(3))
        self.gw, self.ga = torch.zeros(self.size, **opts), torch.zeros(self.size, **opts)
        self.w_views, self.a_views = split_w1t(self.w), split_w1t(self.a)
        self.lr_views = split_w1t(self.lr)
        self.gw_views, self.ga_views = split_w1t(self.gw), split_w1t(self.ga)
        # W1 and its companions as contiguous (D, H): products read whole rows, and the rows of
        # all-zero input pixels are skipped by gathering/scattering rows (see `glance`)
        self.W1t, self.lrW1t = self.w_views[0].t(), self.lr_views[0].t()
        self.gwW1t, self.gaW1t = self.gw_views[0].t(), self.ga_views[0].t()
        self.lr_rest = self.lr[self.p1:]
        self.gw_rest = split(self.gw[self.p1:], rest_shapes, rest_numels)
        self.ga_rest = split(self.ga[self.p1:], rest_shapes, rest_numels)

        # Layers 2..L: explicit fast weights Wr (row 0 = w) and inner gradients Gr; the
        # running sums S_k = g_1 + ... + g_k are one cumsum after the inner loop.
        p2 = self.size - self.p1
        self.Wr = torch.zeros(k + 1, p2, **opts)
        self.Gr, self.Sr = torch.zeros(k, p2, **opts), torch.zeros(k, p2, **opts)
        self.W_rows = [split(row, rest_shapes, rest_numels) for row in self.Wr]
        self.Wt_rows = [[v.t() if v.dim() == 2 else v for v in row] for row in self.W_rows]
        g_rows = [split(row, rest_shapes, rest_numels) for row in self.Gr]
        self.gW_rows = [row[0::2] for row in g_rows]  # (out, in) weight gradients
        self.delta_rows = [[b.view(1, -1) for b in row[1::2]] for row in g_rows]  # (1, out)
        self.deltaT_rows = [[d.t() for d in row] for row in self.delta_rows]
        self.Wr_flat, self.Gr_flat = list(self.Wr), list(self.Gr)  # row views, made once
        self.W_stack, self.S_stack = stacked(self.Wr[1:]), stacked(self.Sr)
        self.Wt_stack = [v.transpose(1, 2) if v.dim() == 3 else v.unsqueeze(1)
                         for v in self.W_stack]

        # First layer: inner errors e_j and the incoming rows' pre-activations.
        self.E = torch.zeros(k, self.hidden, **opts)
        self.E_rows = [e.view(1, -1) for e in self.E]
        self.Zin = torch.zeros(k, self.hidden, **opts)
        self.Z_rows = [z.view(1, -1) for z in self.Zin]
        self.onehot = torch.zeros(k, self.n_out, **opts)
        self.onehot_rows = [o.view(1, -1) for o in self.onehot]
        # prefix @ v: sums over steps j <= k (cumsum is several times slower on CPU);
        # suffix @ v: sums over steps k >= j.
        self.prefix = torch.ones(k, k, **opts).tril_()
        self.suffix = self.prefix.t().contiguous()

    # ------------------------------------------------------------------------------
    def glance(self, x: Tensor, y: Tensor, bx: Tensor, by: Tensor, mask_inner: Tensor | None,
               mask_meta: Tensor | None, need_w: bool, need_alpha: bool, relu_lr: bool,
               incoming_in_meta: bool) -> Tensor:
        """One glance: inner loop on (x, y), meta-loss on (bx, by) at every fast weight set.

        incoming_in_meta: bx ends with the K incoming samples x (La-MAML's meta-batch is
        memory + incoming), whose first-layer corrections then serve the inner loop too.
        mask_inner (C,) / mask_meta (M, C): additive logit masks (0 or MASK_VALUE) or None.
        Writes gw and/or ga; returns the meta-loss (a 0-dim tensor).
        """
        if relu_lr:
            torch.clamp_min(self.a, 0.0, out=self.lr)
        else:
            self.lr.copy_(self.a)
        X, XW, B, T, T_in, cols = self._first_layer(x, bx, incoming_in_meta)
        self._inner_loop(y, T_in, mask_inner)
        return self._meta_gradients(X, XW, B, T, cols, by, mask_meta, need_w, need_alpha,
                                    relu_lr)

    def _first_layer(self, x: Tensor, bx: Tensor, incoming_in_meta: bool):
        """Meta-batch rows X, their pre-activations XW at w, the products B and corrections T
        (below), T on the incoming rows, and the input columns kept (None: all). Writes the
        incoming rows' pre-activations into Zin."""
        k, m = self.k, bx.shape[0]
        b1, lrb1 = self.w_views[1], self.lr_views[1]
        xin = x.reshape(k, -1)
        if incoming_in_meta:  # La-MAML's meta-batch ends with the incoming samples
            X, first = bx.reshape(m, -1), m - k
        else:  # rows m.. serve the inner loop only
            X, first = torch.cat([bx.reshape(m, -1), xin]), m
        XW = torch.addmm(b1, X, self.W1t)  # (rows, H) at w

        # Pixels that are zero in all K incoming samples (MNIST's background: ~45% of them)
        # add nothing to T or to the alpha gradient of W1 below, whose rows there are exactly
        # zero: skip them. CPU only (finding them would be a host sync on a GPU).
        cols, Xc, lrW1t = None, X, self.lrW1t
        if X.device.type == "cpu":
            cols = xin.ne(0).any(0).nonzero().squeeze(1)
            if cols.numel() > 0.8 * X.shape[1]:
                cols = None
            else:
                Xc, xin, lrW1t = X.index_select(1, cols), xin.index_select(1, cols), \
                    lrW1t.index_select(0, cols)

        # T[j, r] = lr_W1 (x_j * X_r) + lr_b1: the first-layer correction of every fast weight.
        B = Xc.unsqueeze(0) * xin.unsqueeze(1)  # (K, rows, D)
        T = torch.addmm(lrb1, B.view(-1, B.shape[-1]), lrW1t).view(k, X.shape[0], -1)
        T_in = T[:, first:first + k].unbind(0)  # K x (K, H): on the incoming rows themselves
        self.Zin.copy_(XW[first:first + k])
        if not incoming_in_meta:
            X, B, T, XW = X[:m], B[:, :m], T[:, :m], XW[:m]
        return X, XW, B, T, T_in, cols

    def _inner_loop(self, y: Tensor, T_in: tuple[Tensor, ...], mask_inner: Tensor | None):
        """K single-sample SGD steps from w (first order: no graph): writes the fast weights
        Wr, inner gradients Gr and first-layer errors E."""
        k = self.k
        self.Wr[0].copy_(self.w[self.p1:])
        self.onehot.zero_().scatter_(1, y.view(k, 1), 1.0)
        n = self.n_rest
        for i in range(k):
            hs = [torch.relu(self.Z_rows[i])]
            Wt, W = self.Wt_rows[i], self.W_rows[i]
            for layer in range(n - 1):
                hs.append(torch.addmm(W[2 * layer + 1], hs[-1], Wt[2 * layer]).relu_())
            logits = torch.addmm(W[-1], hs[-1], Wt[-2])
            if mask_inner is not None:
                logits.add_(mask_inner)
            delta, deltaT = self.delta_rows[i], self.deltaT_rows[i]
            torch.sub(torch.softmax(logits, 1), self.onehot_rows[i], out=delta[-1])
            for layer in range(n - 1, -1, -1):
                torch.mm(deltaT[layer], hs[layer], out=self.gW_rows[i][layer])
                below = delta[layer - 1] if layer else self.E_rows[i]
                # relu': sign(h) of the relu output (threshold_backward's out= is slow)
                torch.mul(torch.mm(delta[layer], W[2 * layer]), torch.sign(hs[layer]), out=below)
            torch.addcmul(self.Wr_flat[i], self.lr_rest, self.Gr_flat[i], value=-1.0,
                          out=self.Wr_flat[i + 1])
            if i + 1 < k:  # the later incoming rows see this step's first-layer change
                self.Zin.addcmul_(T_in[i], self.E_rows[i], value=-1.0)

    def _meta_gradients(self, X, XW, B, T, cols, by, mask_meta, need_w, need_alpha, relu_lr):
        """The meta-loss at the K fast weight sets, forward and backward at once; writes gw
        and/or ga (derivation in the module docstring)."""
        k, m, n, E = self.k, X.shape[0], self.n_rest, self.E
        C = torch.mm(self.prefix, (E.unsqueeze(1) * T).view(k, -1)).view(k, m, -1)
        # C[k] = sum_{j<=k} e_j * T[j]: (K, M, H)
        hs = [torch.sub(XW, C).relu_()]  # (K, M, H)
        ws, wts = self.W_stack, self.Wt_stack
        for layer in range(n - 1):
            hs.append(torch.baddbmm(wts[2 * layer + 1], hs[-1], wts[2 * layer]).relu_())
        logits = torch.baddbmm(wts[-1], hs[-1], wts[-2])
        if mask_meta is not None:
            logits.add_(mask_meta)
        loss, delta = cross_entropy_and_grad(logits, by)
        if need_alpha:
            torch.mm(self.prefix, self.Gr, out=self.Sr)  # S_k = g_1 + ... + g_k
        for layer in range(n - 1, -1, -1):
            gW = torch.bmm(delta.transpose(1, 2), hs[layer])  # (K, out, in): G_k
            gb = delta.sum(1)
            for g, idx in ((gW, 2 * layer), (gb, 2 * layer + 1)):
                if need_w:
                    torch.sum(g, 0, out=self.gw_rest[idx])
                if need_alpha:
                    torch.sum(g.mul_(self.S_stack[idx]), 0, out=self.ga_rest[idx])
            delta = threshold_backward(torch.bmm(delta, ws[2 * layer]), hs[layer], 0)
        # first layer: delta (K, M, H); D_j = sum_{k>=j} delta_k
        D = torch.mm(self.suffix, delta.view(k, -1)).view(k, m, -1)
        if need_w:
            d0 = D[0]
            torch.mm(X.t(), d0, out=self.gwW1t)
            torch.sum(d0, 0, out=self.gw_views[1])
        if need_alpha:
            A = D.mul_(E.unsqueeze(1)).view(k * m, -1)  # rows (j, m): e_j * D_j[m]
            if cols is None:
                torch.mm(B.reshape(k * m, -1).t(), A, out=self.gaW1t)
            else:
                self.gaW1t.zero_().index_copy_(0, cols, torch.mm(B.reshape(k * m, -1).t(), A))
            torch.sum(A, 0, out=self.ga_views[1])
            self.ga.neg_()
            if relu_lr:
                self.ga.mul_(torch.sign(self.lr))  # relu'(alpha); a > 0 is much slower
        return loss
