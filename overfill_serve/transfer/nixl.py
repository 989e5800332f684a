"""NIXL backend of the KV channel: the decode side READs the prefill side's registered pool (RDMA over UCX).

The decode side owns its destination blocks and knows when they are allocated, so it is the initiator: for
each kept layer the prefill side announces as ready (`Describe`, over the gRPC control channel) it validates
the block descriptors and posts one READ into its own blocks; the reads of earlier layers overlap the prefill
of later ones. When every read is done it sends the transfer id as a NIXL notification, and the prefill side
frees the transfer's blocks as soon as it sees it (the gRPC `Release` that follows is then a no-op), so the
prefill side stays passive: it only exposes registered memory and never waits on the decode side.

Both sides register their whole pool (`PagedKVCache.tensor`, one allocation) once. Agents run without NIXL's
progress thread (in NIXL 1.5 its poll delay is hard-coded to 0: it spins a whole core); progress is made by
polling with a growing sleep between polls:

- decode side: while it waits for its reads (`check_xfer_state`), 50 us growing to 1 ms;
- prefill side: the KV server's sweeper calls `NixlSource.poll_notifications` every <= 0.2 s, and each
  `add_peer` / `describe` starts a short burst of polls (50 us growing to 1 ms, for `linger_seconds`) so a
  peer's UCX connection setup and any transport that needs the target's progress (UCX's software RMA over
  TCP between hosts without RDMA) are not held to the sweeper's period. Idle, the burst thread sleeps on an
  event: no CPU.

Handshake payloads (the proto's `nixl_agent_metadata` fields) are msgpack envelopes around NIXL's agent
metadata. The prefill side's also describes its pool (base address, size, geometry, memory type), which is
what the decode side checks every descriptor against: it never reads outside the pool, never across layers or
between K and V, and writes only into the blocks it was given.

Environment: UCX reads `UCX_*` when an agent is created. UCX's default transport list (`all`) is right; a
restricted `UCX_TLS` must keep `tcp` (or an RDMA transport) next to `cma`/shared memory: shared-memory-only
endpoints fail under the peer-failure error mode NIXL uses. On a multi-homed host set `UCX_NET_DEVICES`.

The code: `nixl_agent` (the agent wrapper and the handshake envelopes), `nixl_source` (the prefill side),
`nixl_transport` (the decode side). This module re-exports their public names.
"""

from __future__ import annotations

from overfill_serve.transfer.nixl_agent import INSTALL_HINT, RemotePool, nixl_available
from overfill_serve.transfer.nixl_source import NixlSource
from overfill_serve.transfer.nixl_transport import NixlTransport, coalesce

__all__ = ["INSTALL_HINT", "NixlSource", "NixlTransport", "RemotePool", "coalesce", "nixl_available"]
