"""Durable, tenant-scoped results for inspect_result."""

from .store import RESULT_ID_RE, STREAMS, ResultStore, StoredResult, StoreUnavailable

__all__ = ["RESULT_ID_RE", "STREAMS", "ResultStore", "StoreUnavailable", "StoredResult"]
