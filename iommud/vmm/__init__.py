"""``iommuctl vm``: an unmodified, unprivileged VMM on delegated devices (protocol v2).

``template`` (pure: placeholders to fd numbers), ``qmp`` (an asyncio QMP client),
``control`` (the launcher's hotplug socket) and ``launcher`` (claims, spawn,
supervision, revocation, hotplug). Built on ``iommud.client``; nothing here imports the
daemon, opens /dev or reads sysfs.
"""
