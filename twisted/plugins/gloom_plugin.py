"""Registers ``twistd gloom``; the tap module is imported only when used."""

from twisted.application.service import ServiceMaker

gloom = ServiceMaker(
    "Gloom",
    "gloom.tap",
    "A job-distribution daemon: masters submit jobs, slaves run them.",
    "gloom",
)
