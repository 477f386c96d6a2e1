"""Buffer policy ``fifo``: slime's ``pop_first`` partial-rollout buffer.

Lives in the rollout manager. Aborted groups (``--partial-rollout``) are added at the end of a
rollout; the next rollout takes groups from the front before it reads new prompts.
"""

from __future__ import annotations

from plugrl.core import hookimpl
from plugrl.core.types import Group, Sample


class FifoBuffer:
    """First in, first out. ``n_samples_per_prompt`` (when given) is the size every group must have."""

    name = "fifo"

    def __init__(self, n_samples_per_prompt: int | None = None):
        self.n_samples_per_prompt = n_samples_per_prompt
        self._groups: list[Group] = []

    def _check_sizes(self, groups: list[Group]) -> None:
        if self.n_samples_per_prompt is None:
            return
        for i, group in enumerate(groups):
            if len(group) != self.n_samples_per_prompt:
                raise ValueError(
                    f"buffer '{self.name}': group {i} has {len(group)} samples, expected "
                    f"n_samples_per_prompt={self.n_samples_per_prompt}"
                )

    def add(self, groups: list[Group]) -> None:
        groups = [list(group) for group in groups]
        self._check_sizes(groups)  # all-or-nothing: a bad group leaves the buffer unchanged
        self._groups.extend(groups)

    def take(self, n: int, rollout_id: int | None = None) -> list[Group]:
        count = max(0, min(len(self._groups), n))
        taken, self._groups = self._groups[:count], self._groups[count:]
        return taken

    def __len__(self) -> int:
        return len(self._groups)

    def state_dict(self) -> dict:
        # Plain JSON types, so a checkpoint can store the buffer (slime drops it on resume).
        return {
            "n_samples_per_prompt": self.n_samples_per_prompt,
            "groups": [[sample.to_dict() for sample in group] for group in self._groups],
        }

    def load_state_dict(self, state: dict) -> None:
        groups = [[Sample.from_dict(d) for d in group] for group in state.get("groups", [])]
        self._check_sizes(groups)
        self._groups = groups


@hookimpl
def plugrl_register_buffer_policies(register):
    register("fifo", FifoBuffer, description="first in, first out (slime's pop_first)",
             slime_adapter="plugrl.plugins.filters.slime_compat:slime_buffer_policy")
