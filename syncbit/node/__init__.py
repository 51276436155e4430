"""The node daemon: `app` builds every component from config and runs them (wiring only);
`sync` keeps datasets, plans and pins in step with the scheduler; `reporter` sends
heartbeats and chunk reports and does what their answers ask; `status` answers what is
ready and held, cached from store and fetch events; `http` and `control` are the local
API and probes. Owns no data path: reads go through `syncbit.fs` and the fetch layer.

`app`'s docstring names every thread and task context the daemon runs.
"""

from syncbit.node.app import Node, run

__all__ = ["Node", "run"]
