"""Per-row LoRA adapters read from the data, as Phi-4-multimodal routes each input to its
modality's adapter on one frozen backbone.

A record (an SFT conversation, a preference pair, a GRPO problem) may carry
`"adapter": k`, an index into `lora.adapters`, or -1 for none (the frozen backbone alone).
Under LoRA every row carries `adapter_ids` (int32; 0 for a record without the field, so a
run that never names one trains the first adapter as before), and the model applies adapter
k's update to the rows whose id is k only (`model.lora.Adapter`): a row's loss reaches its
own adapter alone. Without LoRA rows carry no id, and a record that names one is refused.

Packing never mixes adapters in a row: a record that names its adapter needs one record per
row (`data.max_segments_per_row=1`) where the stage packs (SFT). Records without the field
pack as before, all on adapter 0.

A record the run cannot route stops it (`AdapterFieldError`), never skipped as a bad record:
the data and `lora.adapters` disagree, so every such record would be wrong. The first records
of each source are read at start-up (`bad_records.PREFLIGHT_RECORDS`), so a mismatch there
stops the run before anything compiles; a later one stops it when it is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from phi4_jax.errors import Phi4Error

FIELD = "adapter"  # the record's field
BACKBONE = -1  # the id of a row that uses no adapter


class AdapterFieldError(Phi4Error, ValueError):
    """A record's `adapter` field the run cannot honour; the message names the record, the
    value and the fix."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a stage's records choose their adapters: the run's `lora.adapters` (empty without
    LoRA), and whether the stage packs several records into a row."""

    adapters: tuple[str, ...]
    packed: bool = False

    def id_of(self, record: Any, where: object) -> int | None:
        """The record's adapter id, 0 when it names none; None without LoRA (rows carry no
        id). `where` names the record in errors."""
        value = record.get(FIELD) if isinstance(record, Mapping) else None
        if value is None:
            return 0 if self.adapters else None
        named = f"{where}: field {FIELD!r}={value!r}"
        if not self.adapters:
            raise AdapterFieldError(f"{named}, but lora.rank=0 trains no adapters; set "
                                    f"--config.lora.rank and lora.adapters, or drop the field.")
        if isinstance(value, bool) or not isinstance(value, int) or not (
                BACKBONE <= value < len(self.adapters)):
            raise AdapterFieldError(f"{named} is not an index into lora.adapters="
                                    f"{self.adapters}; give an integer in [-1, "
                                    f"{len(self.adapters)}) (-1: the backbone alone).")
        if self.packed:
            raise AdapterFieldError(f"{named}: packed rows would mix adapters; set "
                                    f"--config.data.max_segments_per_row=1 (one record per row).")
        return value


def routing_for(lora: Any) -> Routing:
    """The routing of unpacked rows in a run whose model has `lora` (its `LoRAConfig`, or
    None without LoRA)."""
    return Routing(tuple(lora.adapters) if lora is not None else ())


def with_id(row: dict[str, np.ndarray], adapter_id: int | None) -> dict[str, np.ndarray]:
    """A record's row with its adapter id (a scalar int32), or as it is without LoRA."""
    return row if adapter_id is None else {**row, "adapter_ids": np.int32(adapter_id)}
