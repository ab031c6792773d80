"""Trains a tiny Mixture-of-Experts language model on text this script writes itself.

    python -m jaxmoe.demo [--steps N] [--batch B] [--implementation xla|triton|interpret] [--seed S]

The text mixes three kinds of line, so predicting it takes more than character frequencies:

    the small fox sees a red bird.     a toy grammar: spelling and word order
    4 7 10 13 16 19                    arithmetic runs: each number follows from the two before
    qzkv qzkv qzkv qzkv                a random word, repeated: only attention can predict the copies

Every feed-forward layer of the transformer is a `jaxmoe.MoELayer`, trained with its load-balancing
and router z-losses, which the layer sows and the loss reads through `nnx.capture`. The run prints
the loss before and after training and how the tokens spread over the experts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxmoe

ALPHABET = "\n .0123456789abcdefghijklmnopqrstuvwxyz"
CONTEXT = 32
D_MODEL = 64
NUM_HEADS = 4
NUM_LAYERS = 2
NUM_EXPERTS = 8
TOP_K = 2
D_FF = 64
LOAD_BALANCING_COEF = 0.01
Z_LOSS_COEF = 1e-3
PEAK_LEARNING_RATE = 1e-2
FINAL_WINDOW = 20  # steps the final loss and the expert load are averaged over

DETERMINERS = ("the", "a", "one", "every")
ADJECTIVES = ("small", "red", "quick", "old", "green", "lazy")
NOUNS = ("fox", "bird", "dog", "cat", "fish", "horse")
VERBS = ("sees", "chases", "likes", "bites", "finds")


# --- the text ---------------------------------------------------------------------------------

def _sentence(rng: np.random.Generator) -> str:
    def noun_phrase():
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS))
        return " ".join(words)

    return f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}."


def _arithmetic_run(rng: np.random.Generator) -> str:
    start, step = rng.integers(0, 20), rng.integers(1, 6)
    return " ".join(str(start + i * step) for i in range(6))


def _repeated_word(rng: np.random.Generator) -> str:
    word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 6)))
    return " ".join([word] * 4)


def make_text(rng: np.random.Generator, num_lines: int) -> str:
    kinds = (_sentence, _arithmetic_run, _repeated_word)
    return "\n".join(kinds[rng.integers(len(kinds))](rng) for _ in range(num_lines)) + "\n"


def encode(text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return np.array([index[c] for c in text], dtype=np.int32)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Nats per character of the best model that ignores context: the bar the LM has to beat."""
    p = np.bincount(tokens, minlength=len(ALPHABET)) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def sample_batch(rng: np.random.Generator, tokens: np.ndarray, batch: int) -> np.ndarray:
    """Random windows of CONTEXT + 1 tokens: inputs and their next-token targets."""
    starts = rng.integers(0, len(tokens) - CONTEXT - 1, size=batch)
    return np.stack([tokens[s:s + CONTEXT + 1] for s in starts])


# --- the model --------------------------------------------------------------------------------

class CausalSelfAttention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x):
        B, S, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, S, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, S, d))


class Block(nnx.Module):
    def __init__(self, implementation: str | None, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.attention = CausalSelfAttention(D_MODEL, NUM_HEADS, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.moe = jaxmoe.MoELayer(D_MODEL, D_FF, NUM_EXPERTS, TOP_K, implementation=implementation, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.moe(self.moe_norm(x))


class MoELanguageModel(nnx.Module):
    def __init__(self, implementation: str | None, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(len(ALPHABET), D_MODEL, rngs=rngs)
        self.position_embedding = nnx.Embed(CONTEXT, D_MODEL, rngs=rngs)
        self.blocks = nnx.List([Block(implementation, rngs=rngs) for _ in range(NUM_LAYERS)])
        self.final_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        # Zero logits start the model at uniform guessing, ln(vocabulary size), instead of above it.
        self.unembed = nnx.Linear(D_MODEL, len(ALPHABET), kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, tokens):
        x = self.token_embedding(tokens) + self.position_embedding(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.final_norm(x))


# --- training ---------------------------------------------------------------------------------

def sown(intermediates: nnx.State, name: str) -> list[jax.Array]:
    """Every value sown under `name`, one per MoE layer call, in layer order."""
    return [value for path, variable in nnx.to_flat_state(intermediates) if path[-1] == name
            for value in variable.get_value()]


@nnx.jit
def train_step(model: MoELanguageModel, optimizer: nnx.Optimizer, batch: jax.Array):
    """One AdamW step; returns the cross-entropy and the [layers, E] expert counts of this batch."""
    def loss_fn(model):
        logits, intermediates = nnx.capture(model, nnx.Intermediate)(batch[:, :-1])
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        balance = sum(sown(intermediates, "load_balancing_loss"))
        z = sum(sown(intermediates, "router_z_loss"))
        loss = cross_entropy + LOAD_BALANCING_COEF * balance + Z_LOSS_COEF * z
        return loss, (cross_entropy, jnp.stack(sown(intermediates, "expert_counts")))

    (_, (cross_entropy, counts)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return cross_entropy, counts


def progress_bar(step: int, steps: int, loss: float, tokens_per_s: float, width: int = 30) -> None:
    """One bar redrawn in place on a terminal; elsewhere (a log, a pipe) a plain line every ~10% of steps.

    A carriage return only moves the cursor on a terminal: in a file every redraw would pile onto one line.
    """
    interactive = sys.stderr.isatty()
    if not interactive and step != steps and step % max(steps // 10, 1):
        return
    filled = round(width * step / steps)
    line = (f"step {step:>{len(str(steps))}}/{steps} [{'#' * filled}{'.' * (width - filled)}] "
            f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")
    if interactive:
        print("\r" + line, end="\n" if step == steps else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def expert_load_histogram(counts: np.ndarray, width: int = 40) -> str:
    """counts [layers, E] -> one bar per expert; the busiest expert of any layer gets the full width."""
    shares = counts / counts.sum(axis=1, keepdims=True)
    lines = []
    for layer, layer_shares in enumerate(shares):
        lines.append(f"  layer {layer}")
        for expert, share in enumerate(layer_shares):
            bar = "#" * round(width * share / shares.max())
            lines.append(f"    expert {expert} {bar:<{width}} {share:6.1%}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxmoe.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--batch", type=positive_int, default=32, help=f"sequences of {CONTEXT} tokens per step")
    parser.add_argument("--implementation", choices=jaxmoe.IMPLEMENTATIONS, default=None,
                        help="jaxmoe implementation; default: triton on a GPU, else xla")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    """Trains with a progress bar on stderr; returns what the summary reports."""
    rng = np.random.default_rng(args.seed)
    tokens = encode(make_text(rng, num_lines=10_000))
    model = MoELanguageModel(args.implementation, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LEARNING_RATE, warmup_steps=max(args.steps // 10, 1),
                                                  decay_steps=args.steps, end_value=PEAK_LEARNING_RATE / 10)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)),
                              wrt=nnx.Param)

    losses, recent_counts = [], []
    tokens_per_step = args.batch * CONTEXT
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        cross_entropy, counts = train_step(model, optimizer, jnp.asarray(sample_batch(rng, tokens, args.batch)))
        losses.append(float(cross_entropy))  # waits for the step, so the timing below is honest
        if step > args.steps - FINAL_WINDOW:
            recent_counts.append(np.asarray(counts))
        if step == 1:  # the first step compiles; the throughput leaves it out
            first_step_seconds = time.perf_counter() - start
            start = time.perf_counter()
        tokens_per_s = tokens_per_step * (step - 1) / max(time.perf_counter() - start, 1e-9)
        progress_bar(step, args.steps, losses[-1], tokens_per_s)

    return {
        "implementation": jaxmoe.resolve_implementation(args.implementation),
        "initial_loss": losses[0],
        "losses": losses,
        "final_loss": float(np.mean(losses[-FINAL_WINDOW:])),
        "final_window": len(recent_counts),
        "unigram_entropy": unigram_entropy(tokens),
        "first_step_seconds": first_step_seconds,
        "tokens_per_s": tokens_per_s,
        "expert_counts": np.sum(recent_counts, axis=0),
    }


def print_summary(result: dict) -> None:
    window = result["final_window"]
    print(f"implementation: {result['implementation']}")
    print(f"cross-entropy, nats per character: initial {result['initial_loss']:.3f} (step 1, "
          f"uniform guessing is ln {len(ALPHABET)} = {math.log(len(ALPHABET)):.3f}), "
          f"final {result['final_loss']:.3f} (mean of the last {window} steps)")
    print(f"unigram entropy of the text: {result['unigram_entropy']:.3f} nats per character "
          f"(the best loss without context)")
    print(f"throughput: {result['tokens_per_s']:,.0f} tokens/s after the first step, "
          f"which took {result['first_step_seconds']:.1f} s with compilation")
    print(f"expert load over the last {window} steps (share of the top-{TOP_K} assignments; "
          f"uniform is {1 / NUM_EXPERTS:.1%}):")
    print(expert_load_histogram(result["expert_counts"]))


def main(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns the numbers it printed, for tests."""
    result = train(parse_args(argv))
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
