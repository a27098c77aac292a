"""The traffic programs the lab runs inside its namespaces (`python -m hivenet.lab.traffic.<name>
ARGS...`): each a small standalone program that prints what it measured, one line per fact.
`hivenet.lab.probes` starts them and reads their output back.

They import nothing of HiveNet beyond this package (they run in VM namespaces, where only the
interpreter is shared) and must not touch anything but their own sockets.
"""
