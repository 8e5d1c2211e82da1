"""The rendezvous-store protocol between the endpoints of a transfer.

Plan agreement at connect, a vote before and an outcome after every update,
heartbeats that name a silent peer, and connection epochs for reconnects.
"""

from shardsync.runtime.session.rendezvous import Session, local_address, open_store

__all__ = ["Session", "local_address", "open_store"]
