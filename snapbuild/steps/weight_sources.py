"""Where ``weights`` steps get their files: the Hugging Face Hub, S3, a local folder.

Each source resolves a spec to pins (``{"files": {path: {...}}, ...}``: what exactly
will be fetched) at plan time, and fetches exactly that at build time into a scratch
folder, returning ``{path: local file}``. Build-side only (huggingface_hub, boto3).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import SourceUnreachable, StepError
from ..tools import limit
from ..store.fsutil import file_digest
from .weights_spec import WeightsSpec


def _rest(source: str) -> str:
    return source.split("://", 1)[1]


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it gets no answer: OSError, and the transport
    errors (refused, DNS, TLS, timeout) of the httpx its HTTP backend uses, which are
    not OSErrors."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _unreachable(spec: WeightsSpec, endpoint: str | None, e: BaseException) -> StepError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return SourceUnreachable(f"{spec.source}: the Hub at {endpoint or 'https://huggingface.co'} cannot be reached "
                     f"({type(e).__name__}: {first})",
                     hint="check this machine's network and DNS, or point HF_ENDPOINT (or the step's `endpoint:`) "
                          "at a mirror it can reach")


def _s3_error(spec: WeightsSpec, endpoint: str | None, e: Exception) -> StepError:
    """A botocore error that is not an answer from S3: no credentials, or no S3 to talk to."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return StepError(f"{spec.source}: {e}", hint="give boto3 credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID and "
                                                     "AWS_SECRET_ACCESS_KEY, an instance role...)")
    return SourceUnreachable(f"{spec.source}: S3 at {endpoint or 'its AWS endpoint'} cannot be reached "
                             f"({type(e).__name__}: {str(e)[:200]})",
                             hint="check this machine's network and DNS, and the endpoint (the step's `endpoint:`, "
                                  "SNAPBUILD_S3_ENDPOINT or AWS_ENDPOINT_URL)")


class FileSource:
    """``file://PATH``: a local folder (relative to the recipe's folder), by content."""

    def folder(self, spec: WeightsSpec, base_dir: Path) -> Path:
        root = (base_dir / _rest(spec.source)).resolve()
        if not root.is_dir():
            raise StepError(f"{spec.source}: {root} is not a folder",
                            hint="file:// names a folder, relative to the recipe's folder (file:///abs for absolute)")
        return root

    def resolve(self, spec: WeightsSpec, base_dir: Path) -> dict:
        files = walk_folder(self.folder(spec, base_dir), spec)
        return {"files": {rel: {"sha256": file_digest(p).split(":", 1)[1], "size": p.stat().st_size}
                          for rel, p in files.items()}}

    def fetch(self, spec: WeightsSpec, ctx, scratch: Path) -> dict[str, Path]:
        return walk_folder(self.folder(spec, ctx.base_dir), spec)


class HubSource:
    """``hf://ORG/REPO[@REVISION]`` through huggingface_hub: a branch or tag is pinned to
    its commit, files by size and (for LFS files) sha256."""

    def parse(self, spec: WeightsSpec) -> tuple[str, str]:
        repo, _, revision = _rest(spec.source).partition("@")
        if repo.count("/") > 1 or not repo.strip("/"):
            raise StepError(f"{spec.source}: expected hf://ORG/REPO or hf://ORG/REPO@REVISION")
        return repo, revision or "main"

    def endpoint(self, spec: WeightsSpec) -> str | None:
        return spec.endpoint or os.environ.get("HF_ENDPOINT") or None

    def resolve(self, spec: WeightsSpec, base_dir: Path) -> dict:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        repo, revision = self.parse(spec)
        api = HfApi(endpoint=self.endpoint(spec))
        try:
            # bounded: a Hub that accepts connections and never answers fails the step
            # in SNAPBUILD_HUB_TIMEOUT seconds instead of hanging the plan
            info = api.repo_info(repo, repo_type=spec.repo_type, revision=revision, files_metadata=True,
                                 timeout=limit("hub"))
        except RevisionNotFoundError:
            raise StepError(f"{spec.source}: revision {revision!r} does not exist in {repo}",
                            hint="use a branch, a tag or a commit sha of the repository") from None
        except RepositoryNotFoundError:
            raise StepError(f"{spec.source}: no {spec.repo_type} repository {repo!r} (or no access to it)",
                            hint="check the name; for a private repository set HF_TOKEN or run `hf auth login`") \
                from None
        except HfHubHTTPError as e:
            raise StepError(f"{spec.source}: the Hub answered with an error ({str(e).splitlines()[0][:200]})") \
                from None
        except _network_errors() as e:
            raise _unreachable(spec, self.endpoint(spec), e) from None
        files = {}
        for s in info.siblings or []:
            if spec.selected(s.rfilename):
                meta = {"size": s.size} if s.size is not None else {}
                if getattr(s, "lfs", None) and getattr(s.lfs, "sha256", None):
                    meta["sha256"] = s.lfs.sha256
                files[s.rfilename] = meta
        return {"commit": info.sha, "files": files}

    def fetch(self, spec: WeightsSpec, ctx, scratch: Path) -> dict[str, Path]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo, _ = self.parse(spec)
        commit = ctx.pins["commit"]
        out = {}
        for name in sorted(ctx.pins["files"]):
            if ctx.cancel.is_set():
                raise StepError("interrupted")
            try:
                if ctx.offline:  # the user's Hugging Face cache (HF_HUB_CACHE), by commit
                    path = hf_hub_download(repo, name, revision=commit, repo_type=spec.repo_type,
                                           local_files_only=True)
                else:
                    path = hf_hub_download(repo, name, revision=commit, repo_type=spec.repo_type,
                                           endpoint=self.endpoint(spec), cache_dir=scratch / "hub",
                                           etag_timeout=limit("hub"))
            except LocalEntryNotFoundError:
                if not ctx.offline:
                    raise
                from huggingface_hub.constants import HF_HUB_CACHE

                raise StepError(f"{spec.source}: offline, and {name} at commit {commit[:12]} is neither in the store "
                                f"nor in the Hugging Face cache ({HF_HUB_CACHE})",
                                hint=f"fetch it once where the Hub can be reached (`hf download {repo} "
                                     f"--revision {commit}`, or a build), or build without --offline") from None
            except _network_errors() as e:
                raise _unreachable(spec, self.endpoint(spec), e) from None
            out[name] = Path(path).resolve()
            ctx.log.write(f"fetched {name}\n")
        return out


class S3Source:
    """``s3://BUCKET/PREFIX`` through boto3: each object pinned by version id (versioned
    buckets) or by ETag, size and modification time."""

    def parse(self, spec: WeightsSpec) -> tuple[str, str]:
        bucket, _, prefix = _rest(spec.source).partition("/")
        if not bucket:
            raise StepError(f"{spec.source}: expected s3://BUCKET/PREFIX")
        return bucket, prefix

    def client(self, spec: WeightsSpec):
        import boto3

        from botocore.config import Config

        # bounded: an S3 that accepts connections and never answers fails the step in
        # SNAPBUILD_S3_TIMEOUT seconds (per try) instead of hanging the build
        wait = limit("s3")
        return boto3.client("s3", endpoint_url=spec.endpoint_url, region_name=spec.region,
                            config=Config(connect_timeout=min(wait, 10), read_timeout=wait,
                                          retries={"max_attempts": 3, "mode": "standard"}))

    def resolve(self, spec: WeightsSpec, base_dir: Path) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = self.parse(spec)
        s3 = self.client(spec)
        files = {}
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
                    if not rel or rel.endswith("/") or not spec.selected(rel):
                        continue
                    head = s3.head_object(Bucket=bucket, Key=obj["Key"])
                    meta = {"key": obj["Key"], "size": obj["Size"], "etag": obj["ETag"].strip('"')}
                    version = head.get("VersionId")
                    if version and version != "null":
                        meta["version"] = version
                    else:
                        meta["modified"] = obj["LastModified"].isoformat()
                    files[rel] = meta
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            what = {"NoSuchBucket": "the bucket does not exist", "AccessDenied": "access is denied",
                    "403": "access is denied", "404": "not found"}.get(code, code or "error")
            raise StepError(f"{spec.source}: {what}",
                            hint="check the bucket and prefix, and the credentials boto3 finds "
                                 "(AWS_PROFILE, AWS_ACCESS_KEY_ID, ...)") from None
        except BotoCoreError as e:
            raise _s3_error(spec, spec.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), e) from None
        return {"files": files}

    def fetch(self, spec: WeightsSpec, ctx, scratch: Path) -> dict[str, Path]:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        if ctx.offline:
            raise StepError(f"{spec.source}: offline, and this step's result is not in the store (S3 objects have "
                            "no cache outside it)",
                            hint="build once where S3 can be reached, fill the store from a remote cache "
                                 "(--cache-from), or build without --offline")
        bucket, prefix = self.parse(spec)
        s3 = self.client(spec)
        config = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
        out = {}
        for rel, meta in sorted(ctx.pins["files"].items()):
            if ctx.cancel.is_set():
                raise StepError("interrupted")
            key = meta["key"]
            dest = scratch / "s3" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            extra = {"VersionId": meta["version"]} if "version" in meta else None
            try:
                s3.download_file(bucket, key, str(dest), ExtraArgs=extra, Config=config)
            except ClientError as e:
                raise StepError(f"{spec.source}: cannot download {rel}: "
                                f"{e.response.get('Error', {}).get('Code', e)}") from None
            except BotoCoreError as e:
                raise _s3_error(spec, spec.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), e) from None
            out[rel] = dest
            ctx.log.write(f"fetched {rel} ({meta['size']} bytes)\n")
        return out


def walk_folder(root: Path, spec: WeightsSpec) -> dict[str, Path]:
    """The selected regular files under ``root``; a link that leads outside it is an error."""
    out = {}
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if target != real_root and real_root not in target.parents:
                    raise StepError(f"{spec.source}: {rel} is a link to {os.readlink(path)}, outside the folder",
                                    hint="weights are copied by content; a link out of the folder is refused")
            st = os.stat(path) if path.exists() else None
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            if spec.selected(rel):
                out[rel] = path
    return out
