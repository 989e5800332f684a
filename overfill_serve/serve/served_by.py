"""`ServedBy`: which of the pair's models ran each stage of a request, as both APIs report it (the OpenAI
responses' `overfill` extension field, gRPC's `ServedBy` message)."""

from __future__ import annotations

from dataclasses import dataclass

from overfill_serve.request import Mode


@dataclass(frozen=True)
class ServedBy:
    mode: Mode
    prefill_model: str
    decode_model: str

    @classmethod
    def of(cls, mode: Mode, teacher: str, student: str) -> ServedBy:
        """Which of the pair's models (the full teacher, the pruned student) runs each stage in `mode`."""
        names = {"teacher": teacher, "student": student}
        return cls(mode, *(names[m] for m in mode.models))

    def to_json(self) -> dict[str, str]:
        """The OpenAI responses' `overfill` extension field."""
        return {
            "mode": self.mode.value,
            "prefill_model": self.prefill_model,
            "decode_model": self.decode_model,
        }
