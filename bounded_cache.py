"""The pack's one cache: least-recently-used, bounded by entries and/or by bytes, thread-safe.

Every in-process cache of the pack is a :class:`BoundedCache`, never a dict that grows for the life of the
server or is cleared wholesale when it gets big::

    adapter_sets = BoundedCache("adapter sets", max_bytes=2 << 30, weigh=adapter_set_bytes)
    found = adapter_sets.get(key)
    if found is None:
        found = adapter_sets.put(key, load(...))

Pure Python (no torch, no ComfyUI), so every layer may import it. ``weigh(value)`` gives a value's size in
bytes (``tensor_bytes`` weighs any tensors reachable through dataclasses, tuples, lists, dicts and modules);
a value heavier than ``max_bytes`` on its own is returned by :meth:`put` but not kept. :func:`clear_all` empties
every cache (tests, and a server that wants its memory back).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_ALL: weakref.WeakSet[BoundedCache] = weakref.WeakSet()


class BoundedCache(Generic[K, V]):
    """An LRU map holding at most ``max_entries`` values and at most ``max_bytes`` bytes (by ``weigh``).

    ``name`` appears in debug logs of evictions. At least one bound must be given: an unbounded cache is the
    thing this class exists to prevent.
    """

    def __init__(self, name: str, *, max_entries: int | None = None, max_bytes: int | None = None,
                 weigh: Callable[[V], int] | None = None) -> None:
        if max_entries is None and max_bytes is None:
            raise ValueError(f"cache {name!r}: give max_entries and/or max_bytes")
        if max_bytes is not None and weigh is None:
            raise ValueError(f"cache {name!r}: max_bytes needs a weigh function")
        if (max_entries is not None and max_entries < 0) or (max_bytes is not None and max_bytes < 0):
            raise ValueError(f"cache {name!r}: bounds must be >= 0")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        _ALL.add(self)

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value for ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` (evicting the least recently used beyond the bounds); returns ``value``."""
        size = int(self._weigh(value)) if self._weigh is not None else 0
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self.max_bytes is not None and size > self.max_bytes:
                logger.debug("cache %s: %r (%d bytes) exceeds the %d-byte bound; not kept", self.name, key, size,
                             self.max_bytes)
                return value
            self._items[key] = (value, size)
            self._bytes += size
            self._evict()
        return value

    def get_or_put(self, key: K, make: Callable[[], V]) -> V:
        """The cached value for ``key``, else ``make()`` stored (``make`` runs outside the lock)."""
        found = self.get(key)
        if found is not None:
            return found
        return self.put(key, make())

    def pop(self, key: K) -> V | None:
        """Remove ``key``; its value or ``None``."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def _evict(self) -> None:
        while self._items and ((self.max_entries is not None and len(self._items) > self.max_entries)
                               or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            key, (_, size) = self._items.popitem(last=False)
            self._bytes -= size
            logger.debug("cache %s: evicted %r (%d bytes)", self.name, key, size)

    @property
    def bytes(self) -> int:
        """Bytes held, by ``weigh`` (0 without one)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def keys(self) -> Iterator[K]:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return iter(list(self._items))


def clear_all() -> None:
    """Empty every :class:`BoundedCache` in the process."""
    for cache in list(_ALL):
        cache.clear()


def tensor_bytes(value: object) -> int:
    """Bytes of the tensor storages reachable from ``value`` through dataclasses, tuples, lists, sets, dict
    values and ``torch.nn.Module`` parameters/buffers; a storage shared by several tensors counts once. Other
    objects weigh nothing."""
    seen: set[int] = set()
    total = 0
    stack = [value]
    visited: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if hasattr(item, "untyped_storage"):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += int(storage.nbytes())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list, set, frozenset)):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif hasattr(item, "state_dict") and hasattr(item, "parameters"):
            stack.extend(item.state_dict(keep_vars=True).values())
    return total

