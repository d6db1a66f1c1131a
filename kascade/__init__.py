"""kascade: Kascade sparse attention for long-context LLM inference (arXiv 2512.16391).

    import kascade
    plan = kascade.Plan.load("plan.json")          # or kascade.calibrate(model, texts, num_anchors=5, tokenizer=tok)
    with kascade.enable(model, plan):
        out = model.generate(**inputs, max_new_tokens=64)
"""

__version__ = "0.1.0"

from kascade.budget import budget
from kascade.integrations.transformers import disable, enable
from kascade.plan import Plan, uniform_anchors
from kascade.reference import Selection
from kascade.strategy import KascadeStrategy, Strategy


def calibrate(*args, **kwargs):
    """Choose anchors and head map for a model; see kascade.calibrate.calibrate."""
    from kascade.calibrate import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


__all__ = ["Plan", "Selection", "Strategy", "KascadeStrategy", "budget", "calibrate", "disable", "enable",
           "uniform_anchors", "__version__"]
