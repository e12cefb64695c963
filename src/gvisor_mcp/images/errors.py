"""Errors of the image store: each says what was asked, what went wrong and what to do."""

from __future__ import annotations

from ..errors import ConfigurationError


class ImageError(ConfigurationError):
    """An image operation that failed or was refused; the store is unchanged.

    The operator reads these (`gvisor-mcp image ...`, a policy naming a store
    image). A run whose image left the store meanwhile is refused to the
    agent as runtime.ImageUnavailable."""


class ImageNotFound(ImageError, LookupError):
    """A name or digest the store does not hold."""


class ImageInUse(ImageError):
    """`image rm` of an image a run or a warm pool is using."""

    def __init__(self, ref: str, users: list[str]) -> None:
        self.ref = ref
        self.users = users
        shown = "; ".join(users[:10]) + (f"; and {len(users) - 10} more" if len(users) > 10 else "")
        super().__init__(
            f"image {ref!r} is in use, so it was not removed: {shown}. Wait for the runs to end "
            "(or stop the server / change its policy so its warm pool lets go), then run `image rm` again"
        )
