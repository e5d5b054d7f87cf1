"""The NCCL transport's engine side: the KV connector worker each TP rank builds
(engine/kv_connector.py), over this rank's RankKV. Channels are pairs; a save is a
send that streams layer group by layer group behind the forward's layer events
(GPU), or goes once the forward is done (CPU, gloo); a load is a posted receive."""
from __future__ import annotations

from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorWorker, KVSave

from .config import NcclConfig
from .rank import RankKV


class NcclConnector(KVConnectorWorker):
    config_class = NcclConfig

    def __init__(self, config: NcclConfig, rank: int, tp: int):
        super().__init__(config, rank, tp)
        self.kv: RankKV | None = None
        self._deferred: tuple[KVSave, ...] = ()   # saves of a step without layer events

    def register_kv_cache(self, kv, device) -> None:
        c = self.config
        self.kv = RankKV(kv, device, timeout_s=c.timeout_s, min_message_bytes=int(c.min_message_mib * 2**20),
                         max_ctas=c.max_ctas)

    def apply(self, meta: KVConnectorMetadata) -> None:
        for name in meta.disconnect:
            if name in self.kv.pairs:
                self.kv.close_pair(name)
        for ch in meta.connect:  # in (prefill rank, decode rank) order on both sides: no rank waits on a busy peer
            self.kv.open_pair(ch.name, ch.host, ch.port, ch.side)
        for load in meta.loads:
            self.kv.recv(load.key, list(load.block_ids), _slices(load.routes), load.num_layers)

    def start_step(self, saves: tuple[KVSave, ...], layer_events: list | None) -> None:
        if layer_events is None:  # CPU: the whole KV once computed
            self._deferred = saves
            return
        for s in saves:  # GPU: each layer group leaves from the hook of its last layer
            self.kv.send(s.key, list(s.block_ids), _slices(s.routes), layer_events)

    def save_layer(self, layer: int) -> None:
        self.kv.layer_queued(layer)

    def finish_step(self) -> None:
        saves, self._deferred = self._deferred, ()
        for s in saves:
            self.kv.send(s.key, list(s.block_ids), _slices(s.routes))
        self.kv.end_streams()

    def abort_step(self, reason: str) -> None:
        self._deferred = ()
        self.kv.abort_streams(reason)

    def get_finished(self) -> dict[int, str]:
        return {key: error for key, (ok, error) in self.kv.poll().items()}

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
            self.kv = None


def _slices(routes) -> list[tuple[str, int, int]]:
    return [(r.channel, r.head, r.heads) for r in routes]
