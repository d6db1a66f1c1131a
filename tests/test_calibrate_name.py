"""`kascade.calibrate(...)` calls the paper recipe whether the name holds the function or the package."""

import subprocess
import sys

import pytest


def test_kascade_calibrate_stays_callable_after_a_submodule_import():
    code = (
        "import kascade\n"
        "import kascade.calibrate.output_aware\n"
        "from kascade.models import random_model\n"
        "try:\n"
        "    kascade.calibrate(random_model(), ['a b c'], 0)\n"
        "except ValueError as e:\n"
        "    print('ValueError', str(e).split(':')[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ValueError num_anchors", out.stderr[-2000:]


def test_calling_the_package_is_calling_the_function():
    import kascade.calibrate as pkg
    from kascade.models import random_model

    model = random_model()
    with pytest.raises(ValueError, match="num_anchors") as a:
        pkg(model, ["a b c"], 0)
    with pytest.raises(ValueError) as b:
        pkg.calibrate(model, ["a b c"], 0)
    assert str(a.value) == str(b.value)
