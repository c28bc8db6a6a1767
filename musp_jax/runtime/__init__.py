"""The process around the library, the bottom layer every other may import: start-up
and the mesh (process.py), how a command-line tool ends (cli.py), writing outputs safely
(writing.py)."""
