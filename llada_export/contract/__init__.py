"""The contract between the exporter and the runtime, below both.

- :mod:`.bucket`: the static shape bucket every graph of an engine set is built for;
- :mod:`.pruning`: the one pruning-settings type (CLI -> export -> manifest -> runtime);
- :mod:`.graphset`: the graph set as data (each graph's inputs, outputs, oracle and builder);
- :mod:`.layout`: how one or more requests are placed in the bucket, and the stage A -> B hand-off;
- :mod:`.manifest`: the typed ``manifest.json`` of an engines directory (one reader and validator).

Nothing here imports from ``exporter/``, ``runtime/``, ``engines/`` or ``graphs/``.
"""
