"""AdapterService: list, describe, load (path or upload), unload and delete adapters."""

from __future__ import annotations

import asyncio

from loraserve.core.errors import InvalidArgument
from loraserve.core.lora.ids import ADAPTER_ID_RE, check_id
from loraserve.server.service.convert import adapter_pb
from loraserve.v1 import adapter_pb2, adapter_pb2_grpc

DEFAULT_PAGE = 1000


class AdapterService(adapter_pb2_grpc.AdapterServiceServicer):
    def __init__(self, registry, max_upload_bytes: int):
        self.registry = registry
        self.max_upload_bytes = max_upload_bytes

    async def ListAdapters(self, request, context):
        if request.page_token and not ADAPTER_ID_RE.fullmatch(request.page_token):
            raise InvalidArgument(f"page_token {request.page_token!r} is malformed")
        size = request.page_size or DEFAULT_PAGE
        ids = [i for i in await asyncio.to_thread(self.registry.ids) if i > request.page_token]
        page = ids[:size]
        infos = await asyncio.to_thread(lambda: [self.registry.info(i) for i in page])
        next_token = page[-1] if len(ids) > size else ""
        return adapter_pb2.ListAdaptersResponse(adapters=[adapter_pb(i) for i in infos], next_page_token=next_token)

    async def GetAdapter(self, request, context):
        info = await asyncio.to_thread(self.registry.info, check_id(request.adapter_id))
        return adapter_pb2.GetAdapterResponse(adapter=adapter_pb(info))

    async def LoadAdapter(self, request, context):
        adapter_id = check_id(request.adapter_id)
        source = request.WhichOneof("source")
        if source == "upload":
            files = dict(request.upload.files)
            size = sum(len(v) for v in files.values())
            if size > self.max_upload_bytes:
                raise InvalidArgument(f"upload of {size} bytes exceeds the limit of {self.max_upload_bytes}")
            info = await asyncio.to_thread(self.registry.upload, adapter_id, files, request.overwrite)
        elif source == "path":
            info = await asyncio.to_thread(self.registry.register_path, adapter_id, request.path)
        else:
            info = await asyncio.to_thread(self.registry.load, adapter_id)
        return adapter_pb2.LoadAdapterResponse(adapter=adapter_pb(info))

    async def UnloadAdapter(self, request, context):
        info = await asyncio.to_thread(self.registry.unload, check_id(request.adapter_id))
        return adapter_pb2.UnloadAdapterResponse(adapter=adapter_pb(info))

    async def DeleteAdapter(self, request, context):
        await asyncio.to_thread(self.registry.delete, check_id(request.adapter_id))
        return adapter_pb2.DeleteAdapterResponse()
