"""loraplex.v1.Adapters: upload, list, get, replace, delete, pin -- the /v1/adapters routes over gRPC.

Uploads are client streams: once the caller's key and the metadata check out, the
chunks are written into a staging directory as they arrive, and
``AdapterService.add`` validates, stores and registers them exactly as it does
for a multipart HTTP upload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from server.api.grpc import protocol
from server.api.grpc.pb import adapters_pb2 as apb
from server.api.grpc.pb import adapters_pb2_grpc
from server.service import Service

Context = grpc.aio.ServicerContext


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, service: Service):
        self.service = service

    async def _principal(self, context: Context):
        return await self.service.authenticate(protocol.authorization(context),
                                               charge=protocol.charge(context, self.service))

    async def Upload(self, requests: AsyncIterator[apb.UploadRequest], context: Context) -> apb.Adapter:
        return await self._upload(requests, context, replace=False)

    async def Replace(self, requests: AsyncIterator[apb.UploadRequest], context: Context) -> apb.Adapter:
        return await self._upload(requests, context, replace=True)

    async def _upload(self, requests, context: Context, *, replace: bool) -> apb.Adapter:
        principal = await self._principal(context)  # before reading the body: a bad key is refused whatever it sends
        stream = aiter(requests)
        gap_s = self.service.settings.body_timeout_s
        meta = await protocol.upload_metadata(stream, gap_s)
        adapters, tenant, replace = self.service.adapters, protocol.tenant(meta), replace or meta.replace
        adapters.check_upload(principal, meta.name, tenant, replace=replace)  # a taken name: before the bytes
        async with adapters.staging(principal, field="chunk") as staged:
            await protocol.upload_body(stream, staged, gap_s)
            rec = await adapters.add(principal, meta.name, staged, tenant=tenant, replace=replace)
        return protocol.adapter(self.service, rec)

    async def List(self, request: apb.ListAdaptersRequest, context: Context) -> apb.ListAdaptersResponse:
        records = self.service.adapters.list_adapters(await self._principal(context), protocol.tenant(request))
        return apb.ListAdaptersResponse(adapters=[protocol.adapter(self.service, r) for r in records])

    async def Get(self, request: apb.AdapterRef, context: Context) -> apb.Adapter:
        rec = self.service.adapters.get_adapter(await self._principal(context), request.name, protocol.tenant(request))
        return protocol.adapter(self.service, rec)

    async def Delete(self, request: apb.AdapterRef, context: Context) -> apb.DeleteAdapterResponse:
        principal = await self._principal(context)
        removed = await self.service.adapters.delete(principal, request.name, protocol.tenant(request))
        return apb.DeleteAdapterResponse(name=request.name, versions=len(removed))

    async def Pin(self, request: apb.AdapterRef, context: Context) -> apb.Adapter:
        principal = await self._principal(context)
        rec = await self.service.adapters.set_pinned(principal, request.name, True, protocol.tenant(request))
        return protocol.adapter(self.service, rec)

    async def Unpin(self, request: apb.AdapterRef, context: Context) -> apb.Adapter:
        principal = await self._principal(context)
        rec = await self.service.adapters.set_pinned(principal, request.name, False, protocol.tenant(request))
        return protocol.adapter(self.service, rec)
