"""The README's usage examples run as written, in order."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_usage_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "README has lost its python examples"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    delivered, staleness = capsys.readouterr().out.split()
    # At the first step only gradients with delay 0 can have arrived.
    assert 0 <= int(delivered) <= 8
    assert float(staleness) == 0.0
    for block in blocks[1:]:
        exec(compile(block, str(README), "exec"), namespace)
    # The NNX example: each worker's loss at the initial parameters, by hand, and the
    # module holds the trainer's parameters after the step.
    from flax import nnx

    initial = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    kernel, bias = np.asarray(initial.kernel[...]), np.asarray(initial.bias[...])
    batch = namespace["batch"]
    want = np.mean((np.asarray(batch["x"]) @ kernel[:, 0] + bias - batch["y"]) ** 2, axis=1)
    np.testing.assert_allclose(namespace["losses"], want, rtol=1e-6)
    trainer, model = namespace["trainer"], namespace["model"]
    np.testing.assert_array_equal(model.kernel[...], trainer.state.params["kernel"])
