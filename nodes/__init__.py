"""The pack's V3 nodes and the ComfyUI extension entry point."""
from comfy_api.latest import ComfyExtension, io

from . import attention, encode, invert, nulltext, preview, sampler

NODES: list = [*encode.NODES, *invert.NODES, *nulltext.NODES, *sampler.NODES, *attention.NODES,
               *preview.NODES]


class DDIMInversionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DDIMInversionExtension:
    return DDIMInversionExtension()
