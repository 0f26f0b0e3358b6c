#include "qcow2/encryption.h"

#include <algorithm>
#include <cstring>

#include "qcow2/crypto/legacy_aes.h"
#include "qcow2/crypto/luks.h"

namespace uqcow::qcow2 {
namespace {

constexpr size_t kMinBounce = 64 << 10;
constexpr size_t kMaxPooled = 256;  // more concurrent writes than this allocate

std::span<uint8_t> as_u8(std::span<std::byte> b) { return {reinterpret_cast<uint8_t*>(b.data()), b.size()}; }

}  // namespace

Result<std::unique_ptr<ImageEncryption>> ImageEncryption::open_luks(std::span<const uint8_t> area,
                                                                    std::string_view passphrase) {
  UQ_ASSIGN_OR_RETURN(auto header, crypto::parse_luks_header(area));
  UQ_ASSIGN_OR_RETURN(auto key, crypto::luks_unlock(header, area, passphrase));
  UQ_ASSIGN_OR_RETURN(auto cipher, crypto::SectorCipher::create(header.spec, key.span()));
  return std::unique_ptr<ImageEncryption>(new ImageEncryption(std::move(cipher), true));
}

Result<std::unique_ptr<ImageEncryption>> ImageEncryption::open_legacy_aes(std::string_view passphrase) {
  UQ_ASSIGN_OR_RETURN(auto cipher, crypto::legacy_aes_cipher(passphrase));
  return std::unique_ptr<ImageEncryption>(new ImageEncryption(std::move(cipher), false));
}

Status ImageEncryption::check_aligned(uint64_t guest, uint64_t host, size_t size) const {
  if ((guest | host | size) % crypto::kSectorSize != 0) {
    return Error(EINVAL, "encrypted I/O of " + std::to_string(size) + " bytes at guest offset " +
                             std::to_string(guest) + " is not aligned to 512 bytes");
  }
  return Status();
}

Status ImageEncryption::encrypt(uint64_t guest, uint64_t host, std::span<std::byte> buf) {
  UQ_TRY(check_aligned(guest, host, buf.size()));
  return cipher_->encrypt((physical_ ? host : guest) / crypto::kSectorSize, as_u8(buf));
}

Status ImageEncryption::decrypt(uint64_t guest, uint64_t host, std::span<std::byte> buf) {
  UQ_TRY(check_aligned(guest, host, buf.size()));
  return cipher_->decrypt((physical_ ? host : guest) / crypto::kSectorSize, as_u8(buf));
}

Task<Status> ImageEncryption::read(BlockDevice& file, uint64_t guest, uint64_t host, std::span<std::byte> buf) {
  UQ_CO_TRY(co_await file.co_read(host, buf));
  co_return decrypt(guest, host, buf);
}

Task<Status> ImageEncryption::write(BlockDevice& file, uint64_t guest, uint64_t host,
                                    std::span<const std::byte> data) {
  auto b = bounce(data.size());
  std::span<std::byte> span = b.span();
  std::memcpy(span.data(), data.data(), data.size());
  UQ_CO_TRY(encrypt(guest, host, span));
  co_return co_await file.co_write(host, span);
}

ImageEncryption::Bounce ImageEncryption::bounce(size_t bytes) {
  AlignedBuffer buf;
  if (!pool_.empty()) {
    buf = std::move(pool_.back());
    pool_.pop_back();
  }
  if (buf.size() < bytes) buf = AlignedBuffer(std::max(bytes, kMinBounce));
  return Bounce(this, std::move(buf), bytes);
}

void ImageEncryption::give_back(AlignedBuffer buf) {
  if (pool_.size() < kMaxPooled) pool_.push_back(std::move(buf));
}

}  // namespace uqcow::qcow2
