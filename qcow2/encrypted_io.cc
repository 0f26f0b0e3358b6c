// Encrypted data I/O of Qcow2Image: unlocking at open, and the 512-byte
// alignment the ciphers need (the en/decrypting I/O is ImageEncryption's). QEMU's qcow2_co_encrypt/decrypt and
// qcow2_update_options_prepare's crypto part. Member functions of Qcow2Image.
#include <openssl/crypto.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qcow2/image.h"

namespace uqcow::qcow2 {
namespace {

constexpr uint64_t kSector = crypto::kSectorSize;

// The crypto header area must lie inside the file; its length is bounded by
// parse_header (16 MiB).
Result<std::unique_ptr<ImageEncryption>> open_luks_area(const Header& h, uint64_t file_length,
                                                        std::span<const uint8_t> area, std::string_view passphrase) {
  if (h.crypto_header->offset + h.crypto_header->length > file_length) {
    return Error(EINVAL, "crypto header offset: the area ends past the end of the file");
  }
  return ImageEncryption::open_luks(area, passphrase);
}

}  // namespace

Error Qcow2Image::missing_key() const {
  return Error(ENOKEY, file_->name() + " is encrypted: give its passphrase with --passphrase-file");
}

Task<Status> Qcow2Image::open_encryption() {
  if (!encrypted()) co_return Status();
  if (size_ % kSector != 0) {
    co_return Error(EINVAL, file_->name() + ": size " + std::to_string(size_) +
                                " is not a multiple of 512, which encryption needs");
  }
  if (header_.crypt_method == CryptMethod::kLuks && !header_.crypto_header) {
    co_return Error(EINVAL, file_->name() + ": crypt_method is LUKS but there is no full disk encryption "
                                            "header extension");
  }
  if (options_.passphrase.empty()) {
    if (!options_.read_only) co_return missing_key();
    co_return Status();  // metadata only; data reads fail with missing_key()
  }
  Result<std::unique_ptr<ImageEncryption>> opened = Error(EINVAL, "");
  if (header_.crypt_method == CryptMethod::kAes) {
    opened = ImageEncryption::open_legacy_aes(options_.passphrase);
  } else {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t file_len, file_->length());
    std::vector<uint8_t> area(header_.crypto_header->length);
    if (header_.crypto_header->offset + area.size() <= file_len) {
      UQ_CO_TRY(co_await file_->co_read(header_.crypto_header->offset,
                                        std::span<std::byte>(reinterpret_cast<std::byte*>(area.data()), area.size())));
    }
    opened = open_luks_area(header_, file_len, area, options_.passphrase);
  }
  OPENSSL_cleanse(options_.passphrase.data(), options_.passphrase.size());
  options_.passphrase.clear();
  if (!opened.ok()) co_return std::move(opened).error().with_context(file_->name());
  crypto_ = std::move(opened).value();
  co_return Status();
}

Task<Status> Qcow2Image::read_encrypted(uint64_t guest, uint64_t host, std::span<std::byte> buf) {
  if (!crypto_) co_return missing_key();
  co_return co_await crypto_->read(*data_file_, guest, host, buf);
}

Task<Status> Qcow2Image::read_unaligned(uint64_t offset, std::span<std::byte> buf) {
  // size_ is a multiple of 512 (open_encryption), so the sectors exist.
  const uint64_t start = offset & ~(kSector - 1);
  const uint64_t end = (offset + buf.size() + kSector - 1) & ~(kSector - 1);
  std::vector<std::byte> sectors(end - start);
  UQ_CO_TRY(co_await read_range(start, sectors, Entry::kWithinRequest));
  std::memcpy(buf.data(), sectors.data() + (offset - start), buf.size());
  co_return Status();
}

Task<Status> Qcow2Image::write_unaligned(uint64_t offset, std::span<const std::byte> buf) {
  auto guard = co_await unaligned_write_lock_.scoped_lock();
  const uint64_t start = offset & ~(kSector - 1);
  const uint64_t end = (offset + buf.size() + kSector - 1) & ~(kSector - 1);
  std::vector<std::byte> sectors(end - start);
  std::span<std::byte> s(sectors);
  if (offset != start) UQ_CO_TRY(co_await read_range(start, s.first(kSector), Entry::kWithinRequest));
  if (offset + buf.size() != end) UQ_CO_TRY(co_await read_range(end - kSector, s.last(kSector), Entry::kWithinRequest));
  std::memcpy(sectors.data() + (offset - start), buf.data(), buf.size());
  co_return co_await write_range(start, sectors, Entry::kWithinRequest);
}

}  // namespace uqcow::qcow2
