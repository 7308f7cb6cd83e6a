"""What is trained and what travels. Importing this package imports no torch:
`models.wire` is torch-free; `models.nets`, `models.registry` and `models.data` pull torch in."""
