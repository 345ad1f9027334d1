// Files in the TPM key store's key_dir: TPM key blobs (public and private parts of objects created
// under the primary key; useless without the TPM that made them) and small text records. Every
// write is atomic, so a crash leaves either the old file or the new one, never a torn one.
#pragma once

#include <cstddef>
#include <filesystem>

#include "hsm/bytes.h"
#include "hsm/status.h"

namespace medgate::hsm::tpm2 {

// Writes `bytes` to `path` with mode 0600: a temporary file in the same directory, fsync, rename
// over `path`, fsync of the directory. kIOError naming the file when any step fails.
Status write_file_atomically(const std::filesystem::path& path, ByteView bytes);

// The whole file. kNotFound when it does not exist, kCorruption when it is larger than
// `max_bytes` (a key blob is a few hundred bytes), kIOError when it cannot be read.
Result<Bytes> read_small_file(const std::filesystem::path& path, std::size_t max_bytes);

}  // namespace medgate::hsm::tpm2
