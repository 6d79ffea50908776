"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    delivered, staleness = capsys.readouterr().out.split()
    # At the first step only gradients with delay 0 can have arrived.
    assert 0 <= int(delivered) <= 8
    assert float(staleness) == 0.0
