"""The demo trains end to end and prints its summary; a short run keeps this quick."""

import numpy as np

from jaxmoe import demo


def test_short_demo_run_learns_and_reports(capsys):
    result = demo.main(["--steps", "30", "--batch", "8", "--implementation", "xla", "--seed", "3"])
    out, err = capsys.readouterr()

    assert result["final_loss"] < result["initial_loss"] - 0.3
    assert "step 30/30" in err  # the progress bar
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

