"""One hook pair for modules whose state is more than their tensors.

Methods and memories keep host-side copies of a few buffers (a memory's fill level, a task
counter, "has a penalty yet") so that hot code never waits for the device; some also derive
non-tensor state from buffers (which parameters are frozen). After `load_state_dict` those
copies must be rebuilt from the loaded buffers, and a buffer whose shape or dtype depends on
the data must match the stored tensor before it is loaded into.

`ReloadHooks` is an `nn.Module` mixin with two empty hooks around the loading of the module's
*own* parameters and buffers (children load after their parent, so a hook reads only its own
tensors):

- `before_load(state_dict, prefix)`: resize or retype buffers to the stored tensors;
- `after_load()`: rebuild host copies and derived state from the loaded buffers.

Subclasses override the hooks and call `super()` so that every class in the chain runs its own.
"""

from __future__ import annotations

from torch import nn


class ReloadHooks(nn.Module):
    def before_load(self, state_dict: dict, prefix: str) -> None:
        """Make this module's buffers fit the stored tensors `state_dict[prefix + name]`."""

    def after_load(self) -> None:
        """Rebuild what mirrors this module's buffers (host copies, requires_grad flags)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.before_load(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.after_load()
