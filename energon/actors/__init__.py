"""The asyncio actor runtime: a controller calls methods of actors hosted in worker processes.

    group = await ActorGroup.spawn("pkg.module:Class", world_size=2, args=(...))
    result = await group[0].call("method", x)
    results = await group.broadcast("method", x)
    await group.shutdown()

No model code here, and no torch at import time (only where a tensor frame is encoded/decoded).
"""

from energon.actors.context import ActorContext, actor_context
from energon.actors.controller import ActorGroup, ActorHandle
from energon.actors.deferred import Deferred

__all__ = ["ActorContext", "ActorGroup", "ActorHandle", "Deferred", "actor_context"]
