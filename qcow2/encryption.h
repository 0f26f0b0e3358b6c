// ImageEncryption: the data encryption of one open qcow2 image (QEMU's
// s->crypto with qcow2_co_encrypt/decrypt), for crypt_method 1 (legacy AES)
// and 2 (LUKS in the FDE header area).
//
// Sector numbering (QEMU's crypt_physical_offset): LUKS counts 512-byte
// sectors from the HOST offset of the data, legacy AES from the GUEST
// offset. Both need requests aligned to 512 bytes.
//
// Writes never encrypt the caller's buffer: they encrypt a bounce buffer
// taken from a pool that keeps returned buffers, so in steady state no
// request allocates. Single reactor thread, like the image.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/crypto/sector_cipher.h"
#include "uring/aligned_buffer.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class ImageEncryption {
 public:
  // Unlocks the LUKS header held in `area` (the whole FDE area). EPERM for a
  // wrong passphrase; EINVAL/ENOTSUP naming a bad or unsupported field.
  static Result<std::unique_ptr<ImageEncryption>> open_luks(std::span<const uint8_t> area,
                                                            std::string_view passphrase);
  static Result<std::unique_ptr<ImageEncryption>> open_legacy_aes(std::string_view passphrase);
  ~ImageEncryption() = default;  // the cipher wipes its key schedules

  // En/decrypts `buf` in place: data of guest offset `guest` stored at host
  // offset `host`. Both offsets and the size are multiples of 512 (EINVAL).
  Status encrypt(uint64_t guest, uint64_t host, std::span<std::byte> buf);
  Status decrypt(uint64_t guest, uint64_t host, std::span<std::byte> buf);

  // The data I/O of an encrypted image: reads `buf` from `file` at `host`
  // and decrypts it; encrypts `data` into a pooled bounce buffer and writes
  // it at `host` (the caller's buffer is never modified).
  Task<Status> read(BlockDevice& file, uint64_t guest, uint64_t host, std::span<std::byte> buf);
  Task<Status> write(BlockDevice& file, uint64_t guest, uint64_t host, std::span<const std::byte> data);

  // A pooled, O_DIRECT-aligned buffer of at least `bytes`, handed back to the
  // pool when the Bounce goes away (which must be before the pool).
  class Bounce {
   public:
    Bounce(ImageEncryption* owner, AlignedBuffer buf, size_t size)
        : owner_(owner), buf_(std::move(buf)), size_(size) {}
    Bounce(Bounce&& o) noexcept : owner_(std::exchange(o.owner_, nullptr)), buf_(std::move(o.buf_)), size_(o.size_) {}
    Bounce(const Bounce&) = delete;
    Bounce& operator=(const Bounce&) = delete;
    Bounce& operator=(Bounce&&) = delete;
    ~Bounce() {
      if (owner_) owner_->give_back(std::move(buf_));
    }
    std::span<std::byte> span() { return {buf_.data(), size_}; }

   private:
    ImageEncryption* owner_;
    AlignedBuffer buf_;
    size_t size_;
  };
  Bounce bounce(size_t bytes);

  bool physical_offsets() const { return physical_; }

 private:
  ImageEncryption(std::unique_ptr<crypto::SectorCipher> cipher, bool physical)
      : cipher_(std::move(cipher)), physical_(physical) {}
  Status check_aligned(uint64_t guest, uint64_t host, size_t size) const;
  void give_back(AlignedBuffer buf);

  std::unique_ptr<crypto::SectorCipher> cipher_;
  bool physical_;                    // IV sectors from the host offset (LUKS)
  std::vector<AlignedBuffer> pool_;  // free bounce buffers
};

}  // namespace uqcow::qcow2
