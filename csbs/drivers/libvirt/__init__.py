"""The ``libvirt`` compute driver: back up the domains that already run on a host."""

from csbs.drivers.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
