"""The demo trains end to end and prints its summary; a short run keeps this quick."""

import io

import numpy as np

from jaxmoe import demo


def test_short_demo_run_learns_and_reports(capsys):
    result = demo.main(["--steps", "30", "--batch", "8", "--implementation", "xla", "--seed", "3"])
    out, err = capsys.readouterr()

    assert result["final_loss"] < result["initial_loss"] - 0.3
    assert "step 30/30" in err  # the progress bar
    assert "\r" not in err  # capsys is not a terminal
    assert "implementation: xla" in out
    assert f"initial {result['initial_loss']:.3f}" in out
    assert f"final {result['final_loss']:.3f}" in out
    counts = result["expert_counts"]
    assert counts.shape == (demo.NUM_LAYERS, demo.NUM_EXPERTS)
    # every token of the last steps was counted top_k times in each layer
    np.testing.assert_array_equal(counts.sum(axis=1), demo.FINAL_WINDOW * 8 * demo.CONTEXT * demo.TOP_K)
    for layer in range(demo.NUM_LAYERS):
        assert f"layer {layer}" in out
    assert out.count("expert ") >= demo.NUM_LAYERS * demo.NUM_EXPERTS



def _bar_output(monkeypatch, steps: int, terminal: bool) -> str:
    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    stderr = Stderr()
    monkeypatch.setattr("sys.stderr", stderr)
    for step in range(1, steps + 1):
        demo.progress_bar(step, steps, loss=1.0, tokens_per_s=100.0)
    return stderr.getvalue()


def test_progress_bar_off_a_terminal_prints_a_line_every_tenth(monkeypatch):
    out = _bar_output(monkeypatch, steps=305, terminal=False)
    lines = out.splitlines()
    assert "\r" not in out
    assert [line.split()[1] for line in lines] == [f"{30 * i}/305" for i in range(1, 11)] + ["305/305"]


def test_progress_bar_on_a_terminal_redraws_one_line(monkeypatch):
    out = _bar_output(monkeypatch, steps=30, terminal=True)
    assert out.count("\r") == 30 and out.count("\n") == 1 and out.endswith("\n")
    assert "step 30/30" in out
