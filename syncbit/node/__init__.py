"""The node daemon: the composition root (`app`) and the pieces it wires: the local API
(`http`). Owns no data path: reads go through `syncbit.fs` and the fetch layer.
"""
