"""`TransferControl`: control-only connections to prefill workers' KV servers, one per address, for a process
that holds no KV (the ingress) to abort a transfer nobody will pull."""

from __future__ import annotations

import logging
import threading

from overfill_serve.errors import TransferError
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.transfer.config import TransferConfig

log = logging.getLogger(__name__)


class TransferControl:
    def __init__(self, config: TransferConfig, client_id: str = "ingress") -> None:
        self.config, self.client_id = config, client_id
        self._channels: dict[str, KVChannel] = {}
        self._lock = threading.Lock()

    def abort(self, address: str, transfer_id: str, reason: str) -> None:
        """Best effort (blocking): a transfer nobody aborts is freed by its lease anyway."""
        try:
            self._channel(address).abort(transfer_id, reason)
        except TransferError as e:
            log.debug("abort of %s not delivered: %s", transfer_id, e)

    def stop(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _channel(self, address: str) -> KVChannel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = KVChannel(address, self.config, client_id=self.client_id).connect()
                self._channels[address] = channel
            return channel
