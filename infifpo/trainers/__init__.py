"""Trainers on TRL 1.16: InfiFPO (``trainers.infifpo``), WRPO (``trainers.wrpo``) and the `infifpo train` entry point.

Import the classes from their modules (or lazily from ``infifpo``); this package imports nothing so that
`import infifpo.trainers.data` stays cheap.
"""
