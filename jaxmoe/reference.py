"""The jax.lax implementation: the specification every fast path is held against.

Pipeline: stable argsort of the expert ids (dispatch), `jax.lax.ragged_dot` for the grouped GEMMs,
then a gather back to assignment order and a weighted sum over each token's k rows (combine).

Every permutation here is a gather whose VJP is the gather by the inverse permutation. JAX's own VJP
of a gather is a scatter-add, which XLA runs with float atomics on GPU; a permutation has exactly one
source per row, so gathering instead keeps outputs and gradients bitwise reproducible.

`make_ragged_dot` states the backward of one grouped GEMM as two more grouped GEMMs (dlhs, drhs): the
per-GEMM VJP the kernels are held against, and the glue that lets a peer's ragged GEMM stand in for
`jax.lax.ragged_dot` in `grouped_expert_ffn`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe import _tiled_dot, _validate
from jaxmoe.routing import Routing, expert_probs, route


class MoEAux(NamedTuple):
    """Auxiliary router outputs of `moe`."""

    load_balancing_loss: jax.Array  # E * sum_e (share of the T*k assignments on e) * (mean prob of e)
    router_z_loss: jax.Array  # mean over tokens of logsumexp(logits)^2
    expert_counts: jax.Array  # [E] int32, assignments per expert


class MoERouting(NamedTuple):
    """What `moe` routed, with x's leading dims (the layers sow these under the same names)."""

    router_logits: jax.Array  # [..., E] float32
    routing_ids: jax.Array  # [..., k] int32
    routing_weights: jax.Array  # [..., k] float32


def moe_routing(x2d, router_weight, routing: Routing, lead) -> MoERouting:
    """MoERouting of x2d's tokens, reshaped to lead. The logits are the router product once more, which
    XLA merges with the routing stage's own under jit (one dot, the same operands)."""
    logits = router_logits(x2d, router_weight)
    return MoERouting(logits.reshape(*lead, -1), routing.ids.reshape(*lead, -1), routing.weights.reshape(*lead, -1))


@jax.custom_vjp
def permute_rows(a: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """a[index], where index is a permutation and inverse its inverse."""
    return a[index]


def _permute_rows_fwd(a, index, inverse):
    return a[index], (index, inverse)


def _permute_rows_bwd(residuals, grad):
    index, inverse = residuals
    return grad[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def is_local(local_ids: jax.Array, E: int) -> jax.Array:
    """The local-expert-range rule (kernels/dispatch.py holds the same): an assignment whose id minus
    expert_first lies outside [0, E) belongs to another device (or is out of range). It gets no row,
    contributes exactly zero to y and gets a zero gradient for its routing weight here."""
    return (local_ids >= 0) & (local_ids < E)


def _expert_counts(flat_ids: jax.Array, E: int) -> jax.Array:
    """Assignments per expert; ids outside [0, E) land in a dropped overflow bin."""
    bins = jnp.where(is_local(flat_ids, E), flat_ids, E)
    return jnp.zeros(E + 1, jnp.int32).at[bins].add(1)[:E]  # integer adds: order cannot matter


def _group_rows(group_sizes, n_rows: int, g):
    """[n_rows, 1] bool: the rows of group g (groups hold consecutive rows, in order)."""
    starts = jnp.cumsum(group_sizes) - group_sizes
    rows = jnp.arange(n_rows)
    return ((rows >= starts[g]) & (rows < starts[g] + group_sizes[g]))[:, None]


def _masked_rows_dot(lhs, rhs, group_sizes, precision, out_dtype):
    """out [M, N] = lhs_g @ rhs[g] for each group's rows, the rows of other groups selected away."""

    def one_group(g, out):
        mine = _group_rows(group_sizes, lhs.shape[0], g)
        part = jnp.dot(jnp.where(mine, lhs, 0), rhs[g], precision=precision, preferred_element_type=out_dtype)
        return jnp.where(mine, part, out)

    return jax.lax.fori_loop(0, rhs.shape[0], one_group, jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype))


def ragged_dot_transposes(lhs, rhs, group_sizes, dout, *, precision=None):
    """(dlhs, drhs) of default_ragged_dot for the cotangent dout, with no forward recomputed:
    dlhs = dout_g @ rhs[g]^T and drhs[g] = lhs_g^T @ dout_g, one group at a time with the other groups'
    rows selected away, in the cotangent's dtype as autodiff of the dots would compute them.

    Written out, on every backend, rather than left to jax.linear_transpose of jax.lax.ragged_dot: on
    GPUs XLA expands both transposes (and even a forward-style ragged dot of a float32 cotangent) into
    dense [rows, groups * K] float32 operands, 16 GiB for Qwen3-30B-A3B at T=2048, which ran a test out
    of memory. The loop does the same FLOPs in the memory of one masked copy; selecting keeps a
    non-finite weight in its own group's rows. On CPU the loop runs over row blocks instead
    (jaxmoe/_tiled_dot.py), which costs the rows' work rather than the rows' times the groups'."""
    if _on_cpu():
        return _tiled_dot.rows_dot_transposes(lhs, rhs, group_sizes, dout, precision=precision)
    acc = jnp.promote_types(dout.dtype, lhs.dtype)
    dlhs = _masked_rows_dot(dout, jnp.swapaxes(rhs, 1, 2).astype(acc), group_sizes, precision, acc)
    return dlhs.astype(lhs.dtype), _masked_drhs(lhs, rhs, group_sizes, dout, precision)


def _masked_drhs(lhs, rhs, group_sizes, dout, precision):
    """drhs[g] = lhs_g^T @ dout_g, one group at a time with the other groups' rows selected away."""
    acc = jnp.promote_types(dout.dtype, lhs.dtype)

    def one_group(g, drhs):
        mine = _group_rows(group_sizes, lhs.shape[0], g)
        part = jnp.dot(jnp.where(mine, lhs, 0).astype(acc).T, jnp.where(mine, dout, 0), precision=precision,
                       preferred_element_type=acc)
        return drhs.at[g].set(part.astype(rhs.dtype))

    return jax.lax.fori_loop(0, rhs.shape[0], one_group, jnp.zeros(rhs.shape, rhs.dtype))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _all_finite(rhs):
    return jnp.isfinite(rhs).all()


def _forward(lhs, rhs, group_sizes, precision, out_dtype):
    if _on_cpu():
        return _tiled_dot.rows_dot(lhs, rhs, group_sizes, precision=precision, out_dtype=out_dtype)
    lax_dot = functools.partial(jax.lax.ragged_dot, precision=precision, preferred_element_type=out_dtype)
    masked = functools.partial(_masked_rows_dot, precision=precision, out_dtype=out_dtype)
    return jax.lax.cond(_all_finite(rhs), lax_dot, masked, lhs, rhs, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged_dot(lhs, rhs, group_sizes, precision, out_dtype):
    return _forward(lhs, rhs, group_sizes, precision, out_dtype)


def _ragged_dot_fwd(lhs, rhs, group_sizes, precision, out_dtype):
    return _forward(lhs, rhs, group_sizes, precision, out_dtype), (lhs, rhs, group_sizes)


def _ragged_dot_bwd(precision, out_dtype, residuals, dout):
    return (*ragged_dot_transposes(*residuals, dout, precision=precision), None)


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def default_ragged_dot(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
    """The reference's grouped GEMM: `jax.lax.ragged_dot` where that keeps Inf and NaN in their own rows.

    XLA's ragged_dot multiplies the rows of other groups (zeros) by each group's weights, so an Inf or
    NaN in one expert's weights (0 * Inf = NaN) reached every token, on CPUs and on an H200 alike. The
    masked form (_masked_rows_dot, one dense dot per group) selects, rather than multiplies, both the
    group's input rows and its output rows, so a non-finite value stays in the rows it touches. On GPUs
    it takes over only when a weight is not finite (a check that reads the weights once more). On CPU,
    where XLA's ragged_dot costs as much as the masked form (a dense dot per group over all rows), the
    rows go through jaxmoe/_tiled_dot.py instead: the same selection per block of rows and group, at
    about the cost of one dense dot. The VJP is written out (ragged_dot_transposes), so reverse mode keeps only the
    operands, never per-group copies.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    return _ragged_dot(lhs, rhs, jnp.asarray(group_sizes), precision, jnp.dtype(preferred_element_type or lhs.dtype))


def grouped_expert_ffn(x, weights, ids, w_gate, w_up, w_down, expert_first=0, *,
                       ragged_dot: Callable = default_ragged_dot):
    """The expert FFN with a pluggable grouped GEMM (the benchmark swaps in peers' ragged_dot).

    The expert weights hold experts [expert_first, expert_first + E) (expert_first: an int or a traced
    int32 scalar, 0 on one device); assignments to other experts follow `is_local`.
    """
    T, d = x.shape
    k = ids.shape[1]
    E = w_gate.shape[0]
    if T == 0:
        return jnp.zeros((0, d), x.dtype)
    local_ids = ids.reshape(-1).astype(jnp.int32) - jnp.asarray(expert_first, jnp.int32)
    in_range = is_local(local_ids, E)
    # Assignments that are not local sort last, past every group, and get zero weight below.
    perm = jnp.argsort(jnp.where(in_range, local_ids, E), stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))
    group_sizes = _expert_counts(local_ids, E)

    x_sorted = permute_rows(jnp.repeat(x, k, axis=0), perm, inverse)
    gate = ragged_dot(x_sorted, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = ragged_dot(x_sorted, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)
    out_sorted = ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)

    rows = permute_rows(out_sorted, inverse, perm)  # back to assignment order t*k + j
    rows = jnp.where(in_range[:, None], rows, 0.0)
    w = jnp.where(in_range, weights.reshape(-1).astype(jnp.float32), 0.0)
    y = (rows * w[:, None]).reshape(T, k, d).sum(axis=1)
    return y.astype(x.dtype)


def expert_ffn(x, weights, ids, w_gate, w_up, w_down, *, implementation=None):
    """y[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]), FFN_e(v) = (silu(v @ Wg[e]) * (v @ Wu[e])) @ Wd[e].

    Args:
      x: [T, d] float32, bfloat16 or float16.
      weights: [T, k] routing weights (any float dtype; used in float32).
      ids: [T, k] integer expert ids in [0, E).
      w_gate, w_up: [E, d, f], x's dtype.
      w_down: [E, f, d], x's dtype.
      implementation: accepted for signature parity with `jaxmoe.expert_ffn`; must be None or "xla".

    Returns:
      y: [T, d] in x's dtype. Products accumulate in float32; the SwiGLU activation is rounded to x's
      dtype before the down projection, as the fused kernels do.
    """
    if implementation not in (None, "xla"):
        raise ValueError(f"jaxmoe.reference.expert_ffn runs only implementation='xla', got {implementation!r}")
    _validate.check_expert_ffn_args(x, weights, ids, w_gate, w_up, w_down)
    return grouped_expert_ffn(x, weights, ids, w_gate, w_up, w_down)


# jax.lax.RaggedDotDimensionNumbers of the three GEMMs of a grouped GEMM and its VJP, for lhs [M, K] with
# rows grouped (group g holds group_sizes[g] consecutive rows) and rhs [G, K, N]:
RAGGED_DOT_DIMS = jax.lax.RaggedDotDimensionNumbers(  # out [M, N] = lhs @ rhs[g] per row group
    dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
RAGGED_DOT_DLHS_DIMS = jax.lax.RaggedDotDimensionNumbers(  # dlhs [M, K] = dout [M, N] @ rhs[g]^T per row group
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
RAGGED_DOT_DRHS_DIMS = jax.lax.RaggedDotDimensionNumbers(  # drhs [G, K, N] = lhs_g^T @ dout_g, rows contracted
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def make_ragged_dot(general: Callable) -> Callable:
    """A `jax.lax.ragged_dot`-style grouped GEMM whose VJP is two more grouped GEMMs of the same backend.

    Args:
      general: general(lhs, rhs, group_sizes, dims, precision, preferred_element_type) -> array, with the
        semantics of `jax.lax.ragged_dot_general`; it is called with the three dimension numbers above.

    Returns:
      ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes [G], *, precision=None, preferred_element_type=None)
      -> [M, N]. The forward passes preferred_element_type through (the pipeline asks for float32). The
      backward computes dlhs = dout @ rhs[g]^T (ragged rows) and drhs[g] = lhs_g^T @ dout_g (ragged
      contraction), both in the operands' dtype, with the cotangent first rounded to the operands' dtype:
      tokamax's Mosaic GPU kernels reject a float32 cotangent against bf16 operands.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type):
        return general(lhs, rhs, group_sizes, RAGGED_DOT_DIMS, precision, preferred_element_type)

    def ragged_dot_fwd(lhs, rhs, group_sizes, precision, preferred_element_type):
        out = general(lhs, rhs, group_sizes, RAGGED_DOT_DIMS, precision, preferred_element_type)
        return out, (lhs, rhs, group_sizes)  # the operands are both GEMMs' inputs: nothing to recompute

    def ragged_dot_bwd(precision, preferred_element_type, residuals, dout):
        lhs, rhs, group_sizes = residuals
        dout = dout.astype(lhs.dtype)
        dlhs = general(dout, rhs, group_sizes, RAGGED_DOT_DLHS_DIMS, precision, lhs.dtype)
        drhs = general(lhs, dout, group_sizes, RAGGED_DOT_DRHS_DIMS, precision, rhs.dtype)
        return dlhs, drhs, None

    ragged_dot.defvjp(ragged_dot_fwd, ragged_dot_bwd)

    def call(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
        return ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision, preferred_element_type)

    return call


class RouterStats(NamedTuple):
    """Sufficient statistics of the aux losses: sums over tokens, so the stats of a token-sharded batch
    are the sums of its shards' (jaxmoe/sharding.py psums them before `finalize_aux`)."""

    expert_counts: jax.Array  # [E] int32, assignments per expert
    prob_sums: jax.Array  # [E] float32, router probabilities summed over tokens
    z_squared_sum: jax.Array  # float32, sum over tokens of logsumexp(logits)^2
    tokens: jax.Array  # int32, T


def router_stats(logits: jax.Array, routing: Routing, E: int) -> RouterStats:
    z = jax.nn.logsumexp(logits, axis=-1)
    return RouterStats(_expert_counts(routing.ids.reshape(-1), E), routing.probs.sum(axis=0), jnp.sum(z * z),
                       jnp.int32(routing.ids.shape[0]))


def route_with_stats(logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                     bias=None) -> tuple[Routing, RouterStats]:
    """`route`, and the RouterStats of its selection (sums over tokens, which add up over shards)."""
    routing = route(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias)
    return routing, router_stats(logits, routing, logits.shape[-1])


def finalize_aux(stats: RouterStats, top_k: int) -> MoEAux:
    """The aux-loss formulas, from (possibly cross-device summed) RouterStats."""
    E = stats.expert_counts.shape[0]
    # max(., 1) makes T = 0 give zero losses instead of 0/0.
    tokens = jnp.maximum(stats.tokens, 1).astype(jnp.float32)
    assignment_share = stats.expert_counts.astype(jnp.float32) / (tokens * top_k)
    mean_prob = stats.prob_sums / tokens
    load_balancing = E * jnp.sum(assignment_share * mean_prob)
    return MoEAux(load_balancing, stats.z_squared_sum / tokens, stats.expert_counts)


def finalized(route_with_stats_fn: Callable) -> Callable:
    """A routing stage with the signature of `route_with_aux`, from one with that of `route_with_stats`."""

    def route_with_aux_fn(logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True, bias=None):
        routing, stats = route_with_stats_fn(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias)
        return routing, finalize_aux(stats, top_k)

    return route_with_aux_fn


def route_with_aux(logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
                   bias=None) -> tuple[Routing, MoEAux]:
    """`route`, and the aux losses of its selection: the routing stage of `moe_pipeline`."""
    return finalized(route_with_stats)(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias)


def aux_losses(logits: jax.Array, routing: Routing, E: int) -> MoEAux:
    return finalize_aux(router_stats(logits, routing, E), routing.ids.shape[1])


def router_logits(x2d: jax.Array, router_weight: jax.Array) -> jax.Array:
    """[T, E] float32 logits: the float32 product of x and the router weight.

    When both are bfloat16 (or both float16) they are multiplied as they are with float32
    accumulation: every product of two 16-bit floats is exact in float32 (and in tf32), so this is the
    float32 dot of the upcast inputs up to the order of its sum, without a float32 copy of x (on an
    H200 the upcast dot took 34 us of a Qwen3-sized layer at T = 8192).
    """
    if x2d.dtype == router_weight.dtype and jnp.dtype(x2d.dtype).itemsize == 2:
        return jnp.dot(x2d, router_weight, preferred_element_type=jnp.float32)
    return jnp.dot(x2d.astype(jnp.float32), router_weight.astype(jnp.float32))


def route_tokens(x2d, router_weight, *, top_k, scoring, renormalize, bias, routing_fn: Callable):
    """x2d [T, d] -> routing_fn(logits, ...): the router matmul and the routing stage.

    routing_fn has the signature of `route_with_aux` (logits [T, E] float32 -> (Routing, MoEAux)) or
    of `route_with_stats` (-> (Routing, RouterStats)); the Triton stage computes both parts in one kernel.
    """
    logits = router_logits(x2d, router_weight)
    return routing_fn(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias)


def moe_pipeline(x, router_weight, w_gate, w_up, w_down, *, top_k, scoring, renormalize, bias,
                 routing_fn: Callable, expert_ffn_fn: Callable, with_routing: bool = False):
    """x [..., d] -> (y [..., d], MoEAux), with the routing and expert stages supplied by the caller
    (routing_fn with the signature of `route_with_aux`); with_routing adds a MoERouting."""
    d, _ = _validate.check_moe_args(x, router_weight, w_gate, w_up, w_down, top_k, scoring, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, d)
    routing, aux = route_tokens(x2d, router_weight, top_k=top_k, scoring=scoring, renormalize=renormalize,
                                bias=bias, routing_fn=routing_fn)
    y = expert_ffn_fn(x2d, routing.weights, routing.ids, w_gate, w_up, w_down)
    if with_routing:
        return y.reshape(*lead, d), aux, moe_routing(x2d, router_weight, routing, lead)
    return y.reshape(*lead, d), aux


def moe(x, router_weight, w_gate, w_up, w_down, *, top_k, scoring="softmax", renormalize=True, bias=None,
        implementation=None):
    """The whole MoE layer in jax.lax; see `jaxmoe.moe`."""
    if implementation not in (None, "xla"):
        raise ValueError(f"jaxmoe.reference.moe runs only implementation='xla', got {implementation!r}")
    return moe_pipeline(x, router_weight, w_gate, w_up, w_down, top_k=top_k, scoring=scoring,
                        renormalize=renormalize, bias=bias, routing_fn=route_with_aux,
                        expert_ffn_fn=grouped_expert_ffn)


__all__ = ["MoEAux", "MoERouting", "RAGGED_DOT_DIMS", "RAGGED_DOT_DLHS_DIMS", "RAGGED_DOT_DRHS_DIMS", "RouterStats", "Routing",
           "expert_ffn", "expert_probs", "finalized", "make_ragged_dot", "moe", "permute_rows", "route",
           "route_with_aux", "route_with_stats"]
