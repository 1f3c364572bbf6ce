"""Developer scripts: the demo, the template and picture builders (run from the repository root as
`python -m dev.scripts.<name>`), and the shell entry points beside them."""
