"""The base of the bundled estimators: each declares its options (``options_type``, a dataclass of the
run-config fields it reads) and their rules (``check_options``); core fills and checks them on the
driver (``--adv-opt`` pairs, same-named flags; ``core/plugin_options.py``), ``--dry-run`` included.

An estimator reads ``self.options.<field>``: a misspelled field is an ``AttributeError``, never a
silent default.
"""

from __future__ import annotations

from typing import Any, ClassVar

from plugrl.core.plugin_options import estimator_options
from plugrl.core.protocols import AdvantageEstimator


class OptionsEstimator(AdvantageEstimator):
    options_type: ClassVar[type]

    def __init__(self, options: Any = None):
        # ``options`` is the declared object (core's ``build_estimator``) or a run config (``cls(args)``:
        # older call sites and tests), which is turned into the same object here.
        self.options = estimator_options(type(self), options)
        super().__init__(self.options)

    @staticmethod
    def check_options(options: Any) -> list[str]:
        """The estimator's rules on its filled options (driver, ``--dry-run`` too); problem lines."""
        return []

    @classmethod
    def check_config(cls, args: Any) -> None:
        """For callers holding a run config (``plugrl.core.testing.check_estimator``): ``check_options``
        on the options filled from it, raised as one ``ValueError``."""
        problems = cls.check_options(estimator_options(cls, args))
        if problems:
            raise ValueError("; ".join(problems))
