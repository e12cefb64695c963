"""Durable, tenant-scoped results for inspect_result."""

from .store import RESULT_ID_RE, STREAMS, ResultStore, StoredResult

__all__ = ["RESULT_ID_RE", "STREAMS", "ResultStore", "StoredResult"]
