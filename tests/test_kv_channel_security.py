"""KV-channel security (issue 11): challenges expire and are capped, big unauthenticated requests are refused
before they are read, sessions expire (and channels handshake again), chunk headers and the completion are
signed per session (gRPC chunks, NIXL layer descriptions), and the channel runs over mutual TLS on
loopback."""

from __future__ import annotations

import datetime
import ipaddress
import time

import grpc
import pytest
from kv_helpers import decode_kwargs, pool_full, wait_until
from peer_process import SECRET

from overfill_serve import SamplingParams
from overfill_serve._proto.overfill.v1 import kv_transfer_pb2 as pb
from overfill_serve.errors import ChunkError, PeerUnavailableError
from overfill_serve.transfer import auth
from overfill_serve.transfer import server as server_module
from overfill_serve.transfer.channel import KVChannel
from overfill_serve.transfer.chunk import ChunkHeader
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = list(range(10, 47))


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)


def _prefill(pairs, **transfer):
    config = TransferConfig(**{"chunk_bytes": 1024, "timeout_seconds": 5.0, **transfer})
    return PrefillWorker(pairs["depth"].teacher, transfer=config, block_size=4, num_kv_blocks=64).start()


def _decode(pairs, **transfer):
    config = TransferConfig(**{"chunk_bytes": 1024, "timeout_seconds": 5.0, **transfer})
    return DecodeWorker(pairs["depth"].student, transfer=config, **decode_kwargs(pairs["depth"])).start()


def _tokens(decode, ticket):
    return [t for out in decode.generate_from(ticket) for t in out.token_ids]


def test_nonces_answer_once_within_their_time():
    nonces = auth.Nonces(ttl=0.2, cap=4)
    first, stale = nonces.issue(), nonces.issue()
    assert nonces.redeem(first) and not nonces.redeem(first)
    time.sleep(0.3)
    assert not nonces.redeem(stale)
    issued = [nonces.issue() for _ in range(10)]
    assert len(nonces) == 4  # the oldest dropped
    assert not nonces.redeem(issued[0]) and nonces.redeem(issued[-1])


def test_challenge_flood_is_bounded_and_evicted_challenges_fail(pairs):
    prefill = _prefill(pairs, max_challenges=8)
    channel = KVChannel(prefill.address, TransferConfig())
    try:
        evicted = channel.stub.Challenge(pb.ChallengeRequest(), timeout=5).server_nonce
        for _ in range(100):
            channel.stub.Challenge(pb.ChallengeRequest(), timeout=5)
        assert prefill.server.servicer.pending_challenges == 8
        client_nonce = auth.new_nonce()
        request = pb.HandshakeRequest(
            client_id="late",
            server_nonce=evicted,
            client_nonce=client_nonce,
            mac=auth.client_mac(auth.load_secret(SECRET), evicted, client_nonce, b"", b""),
        )
        with pytest.raises(grpc.RpcError) as e:
            channel.stub.Handshake(request, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.connect()  # a fresh challenge still works
    finally:
        channel.close()
        prefill.stop()


def test_big_unauthenticated_request_refused_before_hashing(pairs, monkeypatch):
    prefill = _prefill(pairs)
    hashed: list[int] = []
    real_mac = auth.client_mac
    monkeypatch.setattr(auth, "client_mac", lambda *a: hashed.append(sum(map(len, a))) or real_mac(*a))
    raw = grpc.insecure_channel(prefill.address, options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        handshake = raw.unary_unary(
            "/overfill.v1.KVTransfer/Handshake",
            request_serializer=pb.HandshakeRequest.SerializeToString,
            response_deserializer=pb.HandshakeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            handshake(pb.HandshakeRequest(client_id="flood", layout=b"\0" * (8 << 20)), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert hashed == []
    finally:
        raw.close()
        prefill.stop()


def test_sessions_expire_and_channels_handshake_again(pairs):
    prefill = _prefill(pairs, session_seconds=0.5)
    decode = _decode(pairs)
    try:
        ticket = prefill.submit(PROMPT, GREEDY)
        channel = decode.channel(prefill.address)
        wait_until(lambda: prefill.registry.get(ticket.transfer_id).completion is not None)
        old = channel.metadata
        time.sleep(0.8)
        with pytest.raises(grpc.RpcError) as e:
            channel.stub.RenewLease(pb.TransferRef(transfer_id=ticket.transfer_id), metadata=old, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(_tokens(decode, ticket)) == 6  # the cached channel handshook again
        assert channel.metadata != old
        wait_until(lambda: pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def _man_in_the_middle(monkeypatch, name, rewrite):
    real = getattr(server_module, name)
    monkeypatch.setattr(server_module, name, lambda data, *rest: real(rewrite(data), *rest))


@pytest.mark.parametrize(
    ("name", "rewrite"),
    [
        (
            "encode_chunk_message",
            lambda h: ChunkHeader(**{**ChunkHeader.decode(h).__dict__, "block_start": 0}).encode(),
        ),
        ("encode_done_message", lambda done: pb.Completion(first_token=1, num_tokens=37).SerializeToString()),
    ],
)
def test_forged_chunk_header_or_completion_refused(pairs, monkeypatch, name, rewrite):
    """Rewritten after it was signed (as on the wire): refused, nothing decoded from it."""
    _man_in_the_middle(monkeypatch, name, rewrite)
    prefill, decode = _prefill(pairs, chunk_bytes=256), _decode(pairs, chunk_bytes=256)
    try:
        with pytest.raises(ChunkError, match="MAC"):
            _tokens(decode, prefill.submit(PROMPT, GREEDY))
        assert pool_full(decode.stats())
        wait_until(lambda: pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def test_forged_nixl_layer_description_refused(pairs, monkeypatch):
    """Block addresses rewritten after the prefill side signed them (as on the wire): no READ is posted from
    them, the request fails with a typed error and both pools come back whole."""
    pytest.importorskip("nixl._api")
    real = auth.sign_message

    def rewrite(key, message):
        signed = real(key, message)
        if signed.addresses:
            signed.addresses[0] += signed.block_bytes  # another block of the prefill side's pool
        return signed

    monkeypatch.setattr(auth, "sign_message", rewrite)
    prefill, decode = _prefill(pairs, backend="nixl"), _decode(pairs, backend="nixl")
    try:
        with pytest.raises(ChunkError, match="MAC"):
            _tokens(decode, prefill.submit(PROMPT, GREEDY))
        assert pool_full(decode.stats())
        wait_until(lambda: pool_full(prefill.stats()))
    finally:
        decode.stop()
        prefill.stop()


def _certificates(root, name):
    """A throwaway CA and a certificate it signs for 127.0.0.1 (server and client use), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def pem_key(key):
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kv-node")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "tls_ca": ca.public_bytes(serialization.Encoding.PEM),
        "tls_cert": cert.public_bytes(serialization.Encoding.PEM),
        "tls_key": pem_key(key),
    }
    paths = {}
    for field, data in files.items():
        path = root / f"{name}-{field}.pem"
        path.write_bytes(data)
        paths[field] = str(path)
    return paths


def test_mutual_tls_on_loopback(pairs, tmp_path):
    pytest.importorskip("cryptography")
    tls, other = _certificates(tmp_path, "cluster"), _certificates(tmp_path, "intruder")
    prefill, decode = _prefill(pairs, **tls), _decode(pairs, **tls)
    try:
        assert len(_tokens(decode, prefill.submit(PROMPT, GREEDY))) == 6
        quick = {"timeout_seconds": 2.0}
        with pytest.raises(PeerUnavailableError):  # plaintext: no TLS handshake, no call
            KVChannel(prefill.address, TransferConfig(**quick)).connect()
        with pytest.raises(PeerUnavailableError):  # a certificate the cluster's CA did not sign
            KVChannel(prefill.address, TransferConfig(**quick, **other)).connect()
        wait_until(lambda: pool_full(prefill.stats()) and pool_full(decode.stats()))
    finally:
        decode.stop()
        prefill.stop()
