"""The baselines the KV channel is measured against: raw TCP between two processes on this machine (a spawned
sender `sendall`s, this process `recv_into`s a preallocated buffer) and an in-process memcpy."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import time

import torch


# ----------------------------------------------------------------------------------------------------------
# raw TCP baseline
# ----------------------------------------------------------------------------------------------------------
def _tcp_sender(port: int, max_bytes: int) -> None:
    """Child: connect, then for every 8-byte request n send n bytes from a preallocated buffer (0 ends)."""
    buf = memoryview(bytearray(os.urandom(1 << 20)) * (max_bytes >> 20))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = b""
            while len(head) < 8:
                part = s.recv(8 - len(head))
                if not part:
                    return
                head += part
            (n,) = struct.unpack("!Q", head)
            if n == 0:
                return
            s.sendall(buf[:n])


def raw_tcp(sizes: list[int], runs: int) -> dict[int, list[float]]:
    ctx = mp.get_context("spawn")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sender = ctx.Process(target=_tcp_sender, args=(listener.getsockname()[1], max(sizes)), daemon=True)
        sender.start()
        listener.settimeout(120)
        conn, _ = listener.accept()
    dst = bytearray(max(sizes))
    view = memoryview(dst)
    out: dict[int, list[float]] = {n: [] for n in sizes}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for run in range(runs + 1):  # run 0 warms up
            for n in sizes:
                start = time.perf_counter()
                conn.sendall(struct.pack("!Q", n))
                got = 0
                while got < n:
                    k = conn.recv_into(view[got:n])
                    if k == 0:
                        raise ConnectionError("raw TCP sender went away")
                    got += k
                if run:
                    out[n].append(time.perf_counter() - start)
        conn.sendall(struct.pack("!Q", 0))
    sender.join(30)
    return out


# ----------------------------------------------------------------------------------------------------------
# memcpy baseline
# ----------------------------------------------------------------------------------------------------------
def memcpy(sizes: list[int], runs: int, threads: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in sizes:
            src = torch.ones(n, dtype=torch.uint8)
            dst = torch.zeros(n, dtype=torch.uint8)
            times = []
            for run in range(runs + 1):
                start = time.perf_counter()
                dst.copy_(src)
                if run:
                    times.append(time.perf_counter() - start)
            out[n] = times
            del src, dst
    finally:
        torch.set_num_threads(default)
    return out
